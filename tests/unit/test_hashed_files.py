"""Checkpoint files hashed while they are written: the same bytes as the reference writers, the right BLAKE3 digest
(the one `b3sum` prints)."""

from __future__ import annotations

import blake3
import pytest
import torch
from safetensors.torch import load_file, save_file

from wmtp_core.checkpoint.hashed_files import _INLINE_BYTES, HashingFile, save_safetensors_hashed, torch_save_hashed


def _entry_of(path) -> dict:
    return {"algorithm": "blake3", "digest": blake3.blake3(path.read_bytes()).hexdigest(), "size": path.stat().st_size}


def _mixed_tensors() -> dict[str, torch.Tensor]:
    return {
        "w.embed": torch.randn(64, 32),
        "w.half": torch.randn(5, 3).to(torch.bfloat16),
        "w.fp16": torch.randn(7).to(torch.float16),
        "a.steps": torch.arange(3, dtype=torch.int64),
        "z.double": torch.randn(2, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4).t(),  # not contiguous
    }


def test_safetensors_file_is_byte_identical_to_save_file(tmp_path):
    tensors = _mixed_tensors()
    entry = save_safetensors_hashed(tensors, tmp_path / "ours.safetensors")
    save_file({name: t.contiguous() for name, t in tensors.items()}, tmp_path / "reference.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert entry == _entry_of(tmp_path / "ours.safetensors")


def test_safetensors_file_loads_back_every_tensor_exactly(tmp_path):
    tensors = _mixed_tensors()
    save_safetensors_hashed(tensors, tmp_path / "m.safetensors")
    loaded = load_file(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_tied_weights_are_written_as_two_equal_tensors(tmp_path):
    shared = torch.randn(10, 4)
    save_safetensors_hashed({"embed.weight": shared, "unembed.weight": shared}, tmp_path / "tied.safetensors")
    loaded = load_file(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["embed.weight"], shared) and torch.equal(loaded["unembed.weight"], shared)


def test_unsupported_dtype_is_refused_naming_the_tensor(tmp_path):
    with pytest.raises(TypeError, match="'rotary' has dtype torch.complex64"):
        save_safetensors_hashed({"rotary": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")


@pytest.mark.parametrize("pipelined", [True, False])
def test_hashing_file_digest_matches_the_bytes_on_disk_for_small_and_large_chunks(tmp_path, pipelined):
    chunks = [b"header", bytes(range(256)) * (_INLINE_BYTES // 64), b"", memoryview(b"tail" * 10)]
    with HashingFile(tmp_path / "f.bin", pipelined=pipelined) as file:
        for chunk in chunks:
            assert file.write(chunk) == len(bytes(chunk))
        entry = file.close()
    expected = b"".join(bytes(chunk) for chunk in chunks)
    assert (tmp_path / "f.bin").read_bytes() == expected
    assert entry == {"algorithm": "blake3", "digest": blake3.blake3(expected).hexdigest(), "size": len(expected)}


def test_torch_state_loads_back_and_its_entry_matches_the_file(tmp_path):
    state = {"optimizer": {"state": {0: {"exp_avg": torch.randn(300, 300)}}, "param_groups": [{"lr": 0.1}]}, "step": 7}
    entry = torch_save_hashed(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["step"] == 7
    assert entry == _entry_of(tmp_path / "s.pt")


def test_torch_save_leaves_torchs_crc_setting_as_it_was_even_on_failure(tmp_path):
    assert torch.serialization.get_crc32_options() is True
    torch_save_hashed({"x": torch.ones(2)}, tmp_path / "ok.pt")
    with pytest.raises(Exception):
        torch_save_hashed({"x": lambda: None}, tmp_path / "bad.pt")  # a lambda cannot be pickled
    assert torch.serialization.get_crc32_options() is True


def test_digest_of_an_empty_file_is_the_blake3_reference_value(tmp_path):
    with HashingFile(tmp_path / "empty") as file:
        entry = file.close()
    # BLAKE3's published digest of no input (what `b3sum` prints for an empty file)
    assert entry["digest"] == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
