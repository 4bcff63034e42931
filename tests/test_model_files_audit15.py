"""``save_pretrained`` / ``from_pretrained`` on the folders users have: a save stopped between its
steps, a folder holding other files, a symbolic link, a mount point, a shared umask; the order and
flushing of a save's renames, recovery from the newest complete earlier copy, a model of mixed dtypes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import mount_command

from moe_gen import distributed
from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Tokenizer, load_preset

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tasks():
    return [load_preset("table_species", "train", limit=20)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def build(tasks, tok, seed: int) -> GeneralistModel:
    torch.manual_seed(seed)
    return GeneralistModel.build(flavour("debug"), tasks, tok)


def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def interrupt_replace(monkeypatch, when):
    """Makes the ``os.replace`` for which ``when(src, dst)`` holds raise KeyboardInterrupt (Ctrl-C there)."""
    real = os.replace

    def replace(src, dst):
        if when(os.fspath(src), os.fspath(dst)):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_a_save_stopped_between_its_two_renames_puts_the_earlier_model_back(tasks, tok, tmp_path, monkeypatch):
    target = tmp_path / "model"
    build(tasks, tok, 0).save_pretrained(str(target))
    before = files(target)
    interrupt_replace(monkeypatch, lambda src, dst: ".tmp-" in src and dst == str(target))
    with pytest.raises(KeyboardInterrupt):
        build(tasks, tok, 1).save_pretrained(str(target))
    monkeypatch.undo()
    assert files(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_save_killed_between_its_two_renames_is_recovered_when_loaded(tasks, tok, tmp_path):
    model = build(tasks, tok, 0)
    target = tmp_path / "model"
    model.save_pretrained(str(target))
    os.replace(target, tmp_path / "model.old-4242")  # what a kill after the first rename leaves
    with pytest.warns(UserWarning, match="model.old-4242, is renamed back"):
        loaded = GeneralistModel.from_pretrained(str(target))
    assert torch.equal(loaded.token_embedding.weight, model.token_embedding.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_save_stopped_in_a_folder_of_other_files_leaves_no_weights_to_mix(tasks, tok, tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "NOTES.txt").write_text("mine")  # other files: the model's are replaced one by one
    build(tasks, tok, 0).save_pretrained(str(target))
    interrupt_replace(monkeypatch, lambda src, dst: dst == str(target / "model.safetensors"))
    other = [load_preset("table_species", "train", limit=40)]  # other rows: other fitted statistics
    with pytest.raises(KeyboardInterrupt):
        build(other, tok, 1).save_pretrained(str(target))  # stopped before the new weights are in place
    monkeypatch.undo()
    assert not (target / "model.safetensors").exists()  # the old weights went first: no mix of two models
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read the weights"):
        GeneralistModel.from_pretrained(str(target))
    model = build(tasks, tok, 1)
    model.save_pretrained(str(target))  # a complete save there loads, and keeps the user's file
    loaded = GeneralistModel.from_pretrained(str(target))
    assert torch.equal(loaded.token_embedding.weight, model.token_embedding.weight)
    assert (target / "NOTES.txt").read_text() == "mine"


def test_saving_through_a_symbolic_link_writes_the_folder_it_points_to(tasks, tok, tmp_path):
    (tmp_path / "exp3").mkdir()
    real = tmp_path / "exp3" / "model"
    build(tasks, tok, 0).save_pretrained(str(real))
    link = tmp_path / "best"
    link.symlink_to(real)
    model = build(tasks, tok, 1)
    model.save_pretrained(str(link))
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["best", "exp3"]
    loaded = GeneralistModel.from_pretrained(str(real))
    assert torch.equal(loaded.token_embedding.weight, model.token_embedding.weight)


def test_weight_files_get_the_permissions_the_umask_gives(tasks, tok, tmp_path):
    model = build(tasks, tok, 0)
    mask = os.umask(0o002)
    try:
        model.save_pretrained(str(tmp_path / "model"))
        written = distributed.save_shards(str(tmp_path / "ckpt"), "model", model.state_dict(), model)
    finally:
        os.umask(mask)
    for path in [tmp_path / "model" / "model.safetensors", tmp_path / "model" / "config.json", *written]:
        assert os.stat(path).st_mode & 0o777 == 0o664, path


def test_a_mount_point_receives_the_model(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    prefix = mount_command(str(target), "64m")
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs unshare and mount rights)")
    code = ("import sys, torch; from moe_gen.model import GeneralistModel, flavour; "
            "from moe_gen.tasks import Tokenizer, load_preset; "
            "m = GeneralistModel.build(flavour('debug'), [load_preset('table_species', 'train', limit=8)], "
            "Tokenizer.default()); d = sys.argv[1]; m.save_pretrained(d); m.save_pretrained(d); "
            "open(d + '/NOTES.txt', 'w').write('x'); m.save_pretrained(d); "
            "l = GeneralistModel.from_pretrained(d); "
            "print('SAME', torch.equal(l.token_embedding.weight, m.token_embedding.weight), "
            "sorted(__import__('os').listdir(d)))")
    script = f"mount -t tmpfs -o size=64m tmpfs {target} && {sys.executable} -c \"{code}\" {target}"
    result = subprocess.run([*prefix, "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names = ["NOTES.txt", "config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"]
    assert f"SAME True {names}" in result.stdout


@pytest.mark.parametrize("stopped_at", ["config.json", "tokenizer.json"])
def test_the_new_weights_come_last_so_a_stopped_save_never_pairs_them_with_old_files(tasks, tok, tmp_path,
                                                                                       monkeypatch, stopped_at):
    """Replaced one by one (a folder of other files), the weights go in after every other file: a
    save stopped at any earlier rename leaves no weights beside the old configuration or tokenizer."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "NOTES.txt").write_text("mine")
    build(tasks, tok, 0).save_pretrained(str(target))
    interrupt_replace(monkeypatch, lambda src, dst: dst == str(target / stopped_at))
    with pytest.raises(KeyboardInterrupt):
        build(tasks, tok, 1).save_pretrained(str(target))
    monkeypatch.undo()
    assert not (target / "model.safetensors").exists()


def test_a_save_over_an_earlier_model_is_flushed_before_it_replaces_it_and_leaves_nothing_beside(tasks, tok,
                                                                                                  tmp_path,
                                                                                                  monkeypatch):
    """Every file is flushed (fsync) before the rename that makes it the model, and the parent
    folder (holding that rename) after it; the earlier copy is removed once the new one is in place."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names an fsynced descriptor through /proc")
    target = tmp_path / "model"
    build(tasks, tok, 0).save_pretrained(str(target))
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", os.fspath(src), os.fspath(dst))),
                                                         real_replace(src, dst))[1])
    model = build(tasks, tok, 1)
    model.save_pretrained(str(target))
    monkeypatch.undo()
    root = os.path.realpath(tmp_path)  # (save_pretrained resolves links: the names it renames)
    published = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == os.path.join(root, "model"))
    tmp = events[published][1]
    synced = {e[1] for e in events[:published] if e[0] == "fsync"}
    for name in os.listdir(target):
        assert os.path.join(tmp, name) in synced, f"{name} was not flushed before the folder became the model"
    assert ("fsync", root) in events[published + 1:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded = GeneralistModel.from_pretrained(str(target))
    assert torch.equal(loaded.token_embedding.weight, model.token_embedding.weight)


def test_a_killed_save_is_recovered_from_the_newest_complete_earlier_copy(tasks, tok, tmp_path):
    """Of several ``.old-<pid>`` copies the newest one holding weights is renamed back: not an older
    model, nor a newer copy without weights."""
    older, newer = build(tasks, tok, 0), build(tasks, tok, 1)
    for name, model, mtime in (("model.old-11", older, 1_000_000), ("model.old-22", newer, 2_000_000),
                               ("model.old-33", newer, 3_000_000)):
        model.save_pretrained(str(tmp_path / name))
        os.utime(tmp_path / name, (mtime, mtime))
    os.remove(tmp_path / "model.old-33" / "model.safetensors")
    os.utime(tmp_path / "model.old-33", (3_000_000, 3_000_000))
    with pytest.warns(UserWarning, match="model.old-22, is renamed back"):
        loaded = GeneralistModel.from_pretrained(str(tmp_path / "model"))
    assert torch.equal(loaded.token_embedding.weight, newer.token_embedding.weight)


def test_an_fp32_model_with_bf16_routers_comes_back_as_saved(tok, tmp_path):
    """The model takes the dtype most of its weights have (fp32 here), then each parameter its own:
    cast whole to its routers' bf16 and back, its fp32 location basis (a buffer, not saved) would come
    back rounded and move the bin tokens' logits."""
    from helpers import flavour_with

    from moe_gen.moe import MoE
    from moe_gen.tasks import collate

    task = load_preset("table_species", "train", limit=4)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug", router="token"), [task], tok).eval()
    assert model.location_basis.dtype == torch.float32
    for module in model.modules():
        if isinstance(module, MoE):
            module.router.to(torch.bfloat16)
    batch = collate([model.plan(task).encode(task.data[i], i, training=False) for i in range(3)], tok, model.task_ids)
    model.save_pretrained(str(tmp_path))
    loaded = GeneralistModel.from_pretrained(str(tmp_path)).eval()
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}
    assert {n: b.dtype for n, b in loaded.named_buffers()} == {n: b.dtype for n, b in model.named_buffers()}
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
