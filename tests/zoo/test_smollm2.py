"""SmolLM2 conversion: the parts that need no 93 MB download (the conversion itself is a benchmark step)."""

import pytest

from evomerge.zoo import smollm2


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "no-such-distribution-xyz")
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="not installed.*pip install"):
        smollm2.find_gguf()


def test_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match="not written by this module"):
        smollm2.convert(out, gguf=fake)
    assert (out / "mine.txt").read_text() == "user data"
