"""Quantize the SmolLM2 safetensors checkpoint with gptqmodel on CPU (run as a subprocess).

    python -m tests.quantize_checkpoint SOURCE OUT BITS GROUP_SIZE DESC_ACT

Run from a scratch working directory: gptqmodel writes ./logs and ./torch_extensions there.
"""

import sys

PLAIN_TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and the Louvre museum.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time, a small fox lived at the edge of a quiet forest and watched the seasons change.",
    "The mitochondria is the powerhouse of the cell, producing energy in the form of ATP.",
    "To make bread, mix flour, water, yeast and salt, knead the dough, let it rise, then bake it.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
]
# The model is a chat model: calibrate on chat-formatted turns too, so GPTQ keeps its error low
# on the kind of input it will see (the question the tests ask is among many others).
QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Name three fruits.", "Apples, bananas and oranges are fruits."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a short poem about the sea.", "The sea is wide and deep and blue,\nit sings of storms and skies anew."),
    ("Explain what a computer is.", "A computer is a machine that follows instructions to process information."),
]


def calibration(tokenizer) -> list[str]:
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in QUESTIONS
    ]
    return chats + PLAIN_TEXTS


def main(source: str, out: str, bits: str, group_size: str, desc_act: str) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    config = QuantizeConfig(bits=int(bits), group_size=int(group_size), desc_act=desc_act == "1", sym=True)
    model = GPTQModel.load(source, config)
    model.quantize(calibration(AutoTokenizer.from_pretrained(source)), batch_size=1)
    model.save(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
