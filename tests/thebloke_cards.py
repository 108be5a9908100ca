"""Model cards shaped like TheBloke's READMEs (front matter, header, "Repositories available",
"Prompt template: X" with its block, the branch table), in markdown or as the plain text a card
becomes when it is copied from the rendered page."""

from __future__ import annotations

import re

TEMPLATES = {
    "ChatML": "<|im_start|>system\n{system_message}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "Vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: {prompt} ASSISTANT:\n",
    "None": "{prompt}\n",
    "Orca-Hashes": "### System:\n{system_message}\n\n### User:\n{prompt}\n\n### Assistant:\n",
}


def yaml_quoted(block: str) -> str:
    """A template as TheBloke's front matter holds it: a single-quoted YAML scalar, where n line
    breaks are written as a break and n empty lines, and continuation lines are indented."""
    return re.sub(r"\n+", lambda run: "\n" * (len(run.group()) + 1) + "  ", block.replace("'", "''"))


def thebloke_card(model: str, creator: str, template_name: str, *, plain_text: bool = False,
                  front_matter_template: bool = True) -> str:
    """A README in TheBloke's layout. ``plain_text`` drops the markdown (no headings, no fences),
    as when a card is pasted from the web page."""
    block = TEMPLATES[template_name]
    yaml_block = yaml_quoted(block)
    front = (
        "---\n"
        f"base_model: {creator}/{model}\ninference: false\nlicense: wtfpl\nmodel_creator: {creator}\n"
        f"model_name: {model}\nmodel_type: llama\n"
        + (f"prompt_template: '{yaml_block}'\n" if front_matter_template else "")
        + "quantized_by: TheBloke\n---\n"
    )
    body = f"""
<!-- header start -->
<div style="width: auto; margin-left: auto; margin-right: auto">
<img src="https://i.imgur.com/EBdldam.jpg" alt="TheBlokeAI" style="width: 100%; min-width: 400px;">
</div>
<!-- header end -->

# {model} - GPTQ
- Model creator: [{creator}](https://huggingface.co/{creator})
- Original model: [{model}](https://huggingface.co/{creator}/{model})

<!-- description start -->
## Description

This repo contains GPTQ model files for [{creator}'s {model}](https://huggingface.co/{creator}/{model}).

Multiple GPTQ parameter permutations are provided; see Provided Files below for details of the options
provided, their parameters, and the software used to create them. Please use the prompt format shown below:
other prompt formats will give worse answers.
<!-- description end -->

<!-- repositories-available start -->
## Repositories available

* [GPTQ models for GPU inference, with multiple quantisation parameter options.](https://huggingface.co/TheBloke/{model}-GPTQ)
* [{creator}'s original unquantised fp16 model in pytorch format](https://huggingface.co/{creator}/{model})
<!-- repositories-available end -->

<!-- prompt-template start -->
## Prompt template: {template_name}

```
{block}
```

<!-- prompt-template end -->

<!-- README_GPTQ.md-provided-files start -->
## Provided files, and GPTQ parameters

Multiple quantisation parameters are provided, to allow you to choose the best one for your hardware and requirements.

Each separate quant is in a different branch. See below for instructions on fetching from different branches.

| Branch | Bits | GS | Act Order | Damp % | GPTQ Dataset | Seq Len | Size | ExLlama | Desc |
| ------ | ---- | -- | --------- | ------ | ------------ | ------- | ---- | ------- | ---- |
| [main](https://huggingface.co/TheBloke/{model}-GPTQ/tree/main) | 4 | 128 | Yes | 0.1 | wikitext | 4096 | 4.52 GB | Yes | 4-bit, with Act Order and group size 128g. |
| [gptq-8bit-128g-actorder_True](https://huggingface.co/TheBloke/{model}-GPTQ/tree/gptq-8bit-128g-actorder_True) | 8 | 128 | Yes | 0.1 | wikitext | 4096 | 8.01 GB | No | 8-bit, with group size 128g. |
<!-- README_GPTQ.md-provided-files end -->

## Original model card: {creator}'s {model}

The system prompt must not be empty! Prompt format: ChatML-like, see above. Benchmarks follow.
"""
    text = front + body
    if plain_text:
        lines = []
        for line in text.splitlines():
            if line.startswith("```") or line.startswith("<"):
                continue
            lines.append(line.lstrip("#* ").replace("**", ""))
        text = "\n".join(lines) + "\n"
    return text
