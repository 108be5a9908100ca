import struct

import pytest

from loadstar.engine.errors import BadModelFolderError, ModelNotFoundError
from loadstar.engine.models.folder import inspect_model_folder, list_model_folders, resolve_model_folder
from tests.folders import gguf_folder, hf_folder, llama_config, write_json


def test_unquantized_safetensors_folder(tmp_path):
    folder = hf_folder(tmp_path, weights=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    info = inspect_model_folder(folder)
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama"
    assert info.formats == {"safetensors"}
    assert [w.path for w in info.weight_files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert info.quantization is None
    assert info.chat_template_source == "chat_template.jinja"
    assert info.context_length == 2048
    assert info.has_tokenizer and info.has_config
    assert info.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert info.problems == ()


def test_gptq_parameters_from_quantize_config(tmp_path):
    folder = hf_folder(tmp_path, name="gptq")
    write_json(folder / "quantize_config.json", {"bits": 4, "group_size": 128, "desc_act": True, "sym": True,
                                                 "model_file_base_name": "model"})
    info = inspect_model_folder(folder)
    q = info.quantization
    assert (q.method, q.bits, q.group_size, q.desc_act, q.sym, q.source) == ("gptq", 4, 128, True, True, "quantize_config.json")
    assert q.model_file_base_name == "model"
    assert q.describe() == "GPTQ 4-bit group 128 act-order"


def test_gptq_parameters_from_config_json_quantization_config(tmp_path):
    config = llama_config(quantization_config={"quant_method": "gptq", "bits": 8, "group_size": -1,
                                               "desc_act": False, "checkpoint_format": "gptq_v2"})
    info = inspect_model_folder(hf_folder(tmp_path, config=config))
    q = info.quantization
    assert (q.bits, q.group_size, q.desc_act, q.checkpoint_format, q.source) == (8, -1, False, "gptq_v2", "config.json")
    assert "no group" in q.describe()


def test_contradicting_quantization_files_are_reported(tmp_path):
    config = llama_config(quantization_config={"quant_method": "gptq", "bits": 8, "group_size": 128})
    folder = hf_folder(tmp_path, config=config)
    write_json(folder / "quantize_config.json", {"bits": 4, "group_size": 128})
    info = inspect_model_folder(folder)
    assert info.quantization.bits == 4  # quantize_config.json is the source the model cards name
    assert any("bits=4" in p and "bits=8" in p for p in info.problems)


def test_chat_template_in_tokenizer_config(tmp_path):
    folder = hf_folder(tmp_path)
    write_json(folder / "tokenizer_config.json", {"chat_template": "{% for m in messages %}{% endfor %}"})
    assert inspect_model_folder(folder).chat_template_source == "tokenizer_config.json"


def test_no_weights_and_training_leftovers_ignored(tmp_path):
    folder = hf_folder(tmp_path, weights=())
    (folder / "training_args.bin").write_bytes(b"x")
    info = inspect_model_folder(folder)
    assert info.weight_files == ()
    assert "no weights" in info.summary()


def test_legacy_pt_and_bin_formats(tmp_path):
    folder = hf_folder(tmp_path, weights=("vicuna-4bit-128g.pt", "pytorch_model.bin"))
    assert inspect_model_folder(folder).formats == {"pt", "bin"}


def test_truncated_safetensors_is_a_problem_not_a_crash(tmp_path):
    folder = hf_folder(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-10])
    info = inspect_model_folder(folder)
    assert any("truncated" in p for p in info.problems)


def test_corrupt_safetensors_header_is_a_problem(tmp_path):
    folder = hf_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    info = inspect_model_folder(folder)
    assert any("corrupt safetensors header" in p for p in info.problems)


def test_invalid_config_json_is_a_problem(tmp_path):
    folder = hf_folder(tmp_path)
    (folder / "config.json").write_text("{not json")
    info = inspect_model_folder(folder)
    assert info.has_config is False
    assert any("config.json is not valid JSON" in p for p in info.problems)


def test_gguf_metadata(tmp_path):
    info = inspect_model_folder(gguf_folder(tmp_path))
    assert info.formats == {"gguf"}
    assert info.architecture == "llama"
    assert info.context_length == 4096
    assert info.quantization.method == "gguf" and info.quantization.gguf_type == "Q8_0"
    assert info.chat_template_source == "gguf.Q8_0.gguf"


def test_unreadable_gguf_is_a_problem(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    info = inspect_model_folder(folder)
    assert any("not a readable GGUF file" in p for p in info.problems)


def test_embedded_default_model(default_models_dir):
    info = inspect_model_folder(default_models_dir / "SmolLM2-135M-Instruct")
    assert info.architecture == "llama"
    assert info.quantization.gguf_type == "Q4_1"
    assert info.has_chat_template
    assert info.context_length == 8192


def test_listing_skips_hidden_files_and_partial_downloads(tmp_path):
    hf_folder(tmp_path, name="b-model")
    hf_folder(tmp_path, name="A-model")
    (tmp_path / ".cache").mkdir()
    partial = hf_folder(tmp_path, name="partial")
    (partial / ".incomplete").write_text("")
    (tmp_path / "loose-file.txt").write_text("")
    assert list_model_folders(tmp_path) == ["A-model", "b-model"]
    assert list_model_folders(tmp_path / "missing") == []


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "/abs", "..", "a\\b"])
def test_resolve_rejects_paths_that_are_not_plain_folder_names(tmp_path, name):
    with pytest.raises(ModelNotFoundError):
        resolve_model_folder(tmp_path, name)


def test_resolve_unknown_name_lists_available(tmp_path):
    hf_folder(tmp_path, name="known")
    with pytest.raises(ModelNotFoundError, match=r"no model named 'nope'.*available: known"):
        resolve_model_folder(tmp_path, "nope")


def test_inspecting_a_file_is_an_error(tmp_path):
    file = tmp_path / "f"
    file.write_text("")
    with pytest.raises(BadModelFolderError):
        inspect_model_folder(file)


def test_json_nested_past_any_sense_or_too_large_is_a_problem_named_by_its_file(tmp_path):
    """A hostile repo's configs: parsing one must not raise (RecursionError once escaped and broke
    every model listing), and each is named in one line."""
    folder = hf_folder(tmp_path, name="nested")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "tokenizer_config.json").write_text('{"a": ' * 65 + "1" + "}" * 65)  # parses, but deeper than any config
    info = inspect_model_folder(folder)
    assert "config.json is nested too deeply (over 64 levels)" in info.problems
    assert "tokenizer_config.json is nested too deeply (over 64 levels)" in info.problems
    assert not info.has_config and info.architecture is None
    huge = hf_folder(tmp_path, name="huge")
    with (huge / "config.json").open("w") as out:  # valid JSON past the bound, sparse on disk
        out.write('{"pad": "')
        out.seek(20 << 20)
        out.write('"}')
    assert "config.json is larger than 16 MiB" in inspect_model_folder(huge).problems


def test_one_bad_folder_leaves_the_model_list_to_the_others(tmp_path):
    """Through the real HTTP app: the listing and the admin listing answer, the bad folder with its problem."""
    from fastapi.testclient import TestClient

    from loadstar.api.app import build_http_app
    from loadstar.engine.facade import Engine
    from loadstar.engine.settings import Settings

    models = tmp_path / "models"
    hf_folder(models, name="good")
    (hf_folder(models, name="nested") / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", admin_key="admin-key-0123"))
    try:
        with TestClient(build_http_app(engine)) as client:
            listed = client.get("/v1/models")
            assert listed.status_code == 200, listed.text
            assert [m["id"] for m in listed.json()["data"]] == ["good", "nested"]
            admin = client.get("/admin/models", headers={"Authorization": "Bearer admin-key-0123"})
            assert admin.status_code == 200, admin.text
            loaded = client.post("/admin/models/load", json={"model": "nested"},
                                 headers={"Authorization": "Bearer admin-key-0123"})
            assert loaded.status_code in (400, 422) and "config.json" in loaded.json()["error"]["message"], loaded.text
    finally:
        engine.close()


@pytest.mark.parametrize("header, why", [
    (b'{"w": ' * 5_000 + b"1" + b"}" * 5_000, "corrupt safetensors header (nested too deeply)"),
    (b'{"w": {"dtype": "F16", "shape": [1]}}', "corrupt safetensors header (a tensor without its offsets)"),
])
def test_a_hostile_safetensors_header_is_a_problem_not_a_crash(tmp_path, header, why):
    folder = hf_folder(tmp_path, weights=())
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    info = inspect_model_folder(folder)
    assert any(why in p for p in info.problems), info.problems


def test_a_gguf_folder_names_the_template_llama_cpp_uses(tmp_path):
    """A GGUF folder with a template in tokenizer_config.json too was labelled as using that one,
    while llama.cpp uses the GGUF's own."""
    folder = gguf_folder(tmp_path, chat_template="{{ 'gguf' }}")
    write_json(folder / "tokenizer_config.json", {"chat_template": "{{ 'tokenizer config' }}"})
    assert inspect_model_folder(folder).chat_template_source == "gguf.Q8_0.gguf"
    # beside other weights, the folder's own files still name it (Transformers reads those)
    write_json(folder / "config.json", llama_config())
    hf = hf_folder(tmp_path, name="gguf")
    assert inspect_model_folder(hf).chat_template_source == "tokenizer_config.json"
