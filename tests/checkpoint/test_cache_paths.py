"""CheckpointCache paths: a path is opened as what it names now, through links changed or directories
replaced between uses, and two spellings of one checkpoint share it."""

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from evomerge.checkpoint.reader import CheckpointCache


def _model(path, value):
    path.mkdir(parents=True)
    save_file({"w": torch.full((2,), float(value))}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["X"], "num_hidden_layers": 1}))
    return path


def _value(ck):
    return ck.get("w")[0].item()


def _point(link, target):
    """Point the symbolic link ``link`` at ``target``, replacing it in one step."""
    tmp = link.with_name(link.name + ".new")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def test_a_link_pointed_elsewhere_opens_its_new_target(tmp_path):
    a, b = _model(tmp_path / "a", 1), _model(tmp_path / "b", 2)
    link = tmp_path / "current"
    _point(link, a)
    cache = CheckpointCache()
    try:
        for _ in range(2):
            assert _value(cache.open(link)) == 1
        _point(link, b)
        assert _value(cache.open(link)) == 2
        assert _value(cache.open(tmp_path / "x" / ".." / "current")) == 2
        _point(link, a)
        assert _value(cache.open(tmp_path / "x" / ".." / "current")) == 1
    finally:
        cache.close()


def test_a_directory_replaced_by_a_link_is_read_afresh(tmp_path):
    path = _model(tmp_path / "m", 1)
    other = _model(tmp_path / "other", 2)
    cache = CheckpointCache()
    try:
        for _ in range(2):
            assert _value(cache.open(path)) == 1
        shutil.rmtree(path)
        os.symlink(other, path)
        assert _value(cache.open(path)) == 2
        os.unlink(path)
        _model(path, 3)
        assert _value(cache.open(str(path))) == 3
    finally:
        cache.close()


def test_spellings_of_one_checkpoint_share_it(tmp_path, monkeypatch):
    path = _model(tmp_path / "m", 1)
    os.symlink(path, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    cache = CheckpointCache()
    try:
        first = cache.open(path)
        for spelling in (str(path), tmp_path / "link", "m", "./link", tmp_path / "m" / ".." / "m"):
            assert cache.open(spelling) is first
        assert cache.opened == 1
    finally:
        cache.close()
