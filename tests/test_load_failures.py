"""Every class of load failure is one line, names the file, and never advises turning safety off."""

import pickle

import pytest

from loadstar.engine.models.load_failures import load_failure, pickle_globals


class _Opens:
    def __reduce__(self):
        return (open, ("/nonexistent/pwned", "w"))


@pytest.mark.parametrize("container", ["torch zip", "raw pickle"])
def test_refused_pickles_name_the_code_they_would_run(tmp_path, container):
    import torch

    path = tmp_path / "pytorch_model.bin"
    if container == "torch zip":
        torch.save({"weight": torch.zeros(2), "payload": _Opens()}, path)
    else:
        path.write_bytes(pickle.dumps({"payload": _Opens()}))
    with pytest.raises(Exception) as refused:
        torch.load(path, weights_only=True)
    assert not (tmp_path / "pwned").exists()
    message = load_failure(refused.value, ["pytorch_model.bin"], tmp_path)
    assert message == "pytorch_model.bin contains pickled code (io.open); refused: only tensors are loaded", message
    assert "torch._utils._rebuild_tensor_v2" in pickle_globals(path) or container == "raw pickle"


@pytest.mark.parametrize(("error", "expected"), [
    (RuntimeError("\x1b[31mError(s) in loading state_dict:\n\tsize mismatch for model.norm.weight: copying\x1b[0m"),
     "the weights do not fit config.json (size mismatch for model.norm.weight)"),
    (Exception("Error while deserializing header: HeaderTooLarge"),
     "model.safetensors is damaged or not a safetensors file (Exception)"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried 9 GB"),
     "not enough memory to load the weights (free some RAM/VRAM, or pick a smaller quantization)"),
    (ValueError("\x1b[1mSomething odd happened.\x1b[0m\nPlease retry with trust_remote_code=True\nmore lines"),
     "ValueError: Something odd happened."),
])
def test_each_failure_class_is_one_clean_line(error, expected):
    message = load_failure(error, ["model.safetensors"])
    assert message == expected
    assert "\n" not in message and "\x1b" not in message
