"""The converter never deletes, overwrites or publishes what is not its own (issue 17), and commits only a
validated, fsynced output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from converters.cli import main as cli_main
from converters.convert import ConversionError, ConvertOptions, convert
from easyquant_vllm.format import read_quantization_config, validate_checkpoint
from easyquant_vllm.quant import DEFAULT_FORMAT_VERSION

LAYERS = 15
"""Quantized layers of the tiny Llama converted with the defaults: 2 blocks x 7 projections + its 8-bit lm_head."""


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes): what must survive a refused conversion untouched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_convert_refuses_dst_that_contains_src_and_keeps_everything(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The data-loss bug: `easyquant-convert parent/model parent --overwrite` moved `parent` aside and deleted it,
    # the source model with it.
    parent = tmp_path / "parent"
    src = parent / "model"
    shutil.copytree(tiny_llama, src)
    (parent / "notes.txt").write_text("mine")
    before = _tree(parent)
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match=r"contains the source directory"):
            convert(src, parent, ConvertOptions(overwrite=overwrite), progress=False)
        assert _tree(parent) == before
    assert cli_main([str(src), str(parent), "--overwrite", "--no-progress"]) == 1
    assert "contains the source directory" in capsys.readouterr().err
    assert _tree(parent) == before and sorted(p.name for p in tmp_path.iterdir()) == ["parent"]


def test_convert_refuses_src_equal_to_or_inside_dst_through_symlinks(tiny_llama: Path, tmp_path: Path) -> None:
    src = tmp_path / "model"
    shutil.copytree(tiny_llama, src)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    before = _tree(src)
    with pytest.raises(ConversionError, match="is the source directory"):
        convert(src, link, ConvertOptions(overwrite=True), progress=False)
    with pytest.raises(ConversionError, match="inside the source directory"):
        convert(link, src / "sub" / "eq", progress=False)
    assert _tree(src) == before and not (src / "sub").exists()


def test_convert_overwrite_refuses_a_directory_that_is_not_an_easyquant_checkpoint(
    tiny_llama: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / "sub").mkdir()
    (home / "sub" / "key").write_text("secret")
    with pytest.raises(ConversionError, match=r"home: not an EasyQuant checkpoint \(no config\.json; 2 entries"):
        convert(tiny_llama, home, ConvertOptions(overwrite=True), progress=False)
    assert _tree(home) == {"thesis.tex": b"years of work", "sub/key": b"secret"}

    other = tmp_path / "hf-model"  # a Hugging Face model (config.json without an easyquant quantization_config)
    shutil.copytree(tiny_llama, other)
    before = _tree(other)
    with pytest.raises(ConversionError, match=r"hf-model: not an EasyQuant checkpoint .*quantization_config"):
        convert(tiny_llama, other, ConvertOptions(overwrite=True), progress=False)
    assert _tree(other) == before

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConversionError, match="file: is a file, not a directory"):
        convert(tiny_llama, a_file, ConvertOptions(overwrite=True), progress=False)
    assert a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf-model", "home"]


def test_convert_overwrite_replaces_an_easyquant_checkpoint_only_on_success(tiny_llama: Path, tmp_path: Path) -> None:
    dst = tmp_path / "eq"
    convert(tiny_llama, dst, ConvertOptions(format_version=1), progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        convert(tiny_llama, dst, progress=False)
    before = _tree(dst)
    with pytest.raises(ConversionError):  # a failing overwrite keeps the old checkpoint
        convert(tiny_llama, dst, ConvertOptions(overwrite=True, bits=3), progress=False)
    assert _tree(dst) == before
    convert(tiny_llama, dst, ConvertOptions(overwrite=True), progress=False)
    assert read_quantization_config(dst).format_version == DEFAULT_FORMAT_VERSION
    assert validate_checkpoint(dst)["layers"] == LAYERS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eq"]


def test_convert_dangling_symlink_at_dst_counts_as_existing(tiny_llama: Path, tmp_path: Path) -> None:
    dst = tmp_path / "eq"
    dst.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConversionError, match="already exists"):
        convert(tiny_llama, dst, progress=False)
    with pytest.raises(ConversionError, match="is a symbolic link"):
        convert(tiny_llama, dst, ConvertOptions(overwrite=True), progress=False)
    assert dst.is_symlink() and os.readlink(dst) == str(tmp_path / "nowhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eq"]


def test_convert_overwrite_accepts_an_empty_directory(tiny_llama: Path, tmp_path: Path) -> None:
    dst = tmp_path / "eq"
    dst.mkdir()
    convert(tiny_llama, dst, ConvertOptions(overwrite=True), progress=False)
    assert validate_checkpoint(dst)["layers"] == LAYERS


# --- what the converter reads and copies must be the source's own ------------------------------------------------


def test_convert_refuses_a_side_file_linking_out_of_src(tiny_llama: Path, tmp_path: Path) -> None:
    secret = tmp_path / "id_ed25519"
    secret.write_text("PRIVATE KEY")
    src = tmp_path / "model"
    shutil.copytree(tiny_llama, src)
    (src / "notes.txt").symlink_to(secret)
    with pytest.raises(ConversionError, match=r"model/notes\.txt: side file resolves to .*id_ed25519, outside"):
        convert(src, tmp_path / "eq", progress=False)
    assert not (tmp_path / "eq").exists()
    (src / "notes.txt").unlink()
    (src / "notes.txt").symlink_to(src / "tokenizer.json")  # a link inside the model is fine
    convert(src, tmp_path / "eq", progress=False)
    assert (tmp_path / "eq" / "notes.txt").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/abs/outside.safetensors", "sub/../../x.safetensors"])
def test_convert_refuses_index_entries_outside_src(entry: str, tiny_llama_sharded: Path, tmp_path: Path) -> None:
    src = tmp_path / "model"
    shutil.copytree(tiny_llama_sharded, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = entry
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=rf"{entry!r} is not a path inside the model directory"):
        convert(src, tmp_path / "eq", progress=False)
    assert not (tmp_path / "eq").exists()


def test_convert_refuses_a_weight_file_linking_out_of_src(tiny_llama: Path, tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    for p in tiny_llama.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, src)
    (src / "model.safetensors").symlink_to(tiny_llama / "model.safetensors")
    with pytest.raises(ConversionError, match=r"model\.safetensors: weight file resolves to .*, outside the model"):
        convert(src, tmp_path / "eq", progress=False)


def test_convert_reads_a_hugging_face_cache_snapshot(tiny_llama: Path, tmp_path: Path) -> None:
    # The hub cache stores files once in blobs/ and links them from snapshots/<rev>/: those links are the model's.
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for p in tiny_llama.iterdir():
        shutil.copy(p, repo / "blobs" / f"hash-{p.name}")
        (snap / p.name).symlink_to(Path("../../blobs") / f"hash-{p.name}")
    convert(snap, tmp_path / "eq", progress=False)
    assert validate_checkpoint(tmp_path / "eq")["layers"] == LAYERS


# --- the output: converts zero and constant tensors, validated and flushed before the commit ----------------------


def _tiny_with(tiny: Path, dst: Path, fill: dict[str, float]) -> Path:
    """A copy of the tiny model with the named weights (regex on the name) set to a constant."""
    import re

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for name in tensors:
        for pattern, value in fill.items():
            if re.search(pattern, name):
                tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_convert_zero_and_constant_tensors(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every up_proj all zeros (no gain to print: was a ZeroDivisionError after DST was written), every k_proj
    # one constant.
    src = _tiny_with(tiny_llama, tmp_path / "src", {r"up_proj\.weight": 0.0, r"k_proj\.weight": 0.0125})
    dst = tmp_path / "eq"
    assert cli_main([str(src), str(dst), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "up_proj" in out and "total" in out
    from easyquant_vllm.reference import dequantized_state_dict

    sd = dequantized_state_dict(dst)
    assert not sd["model.layers.0.mlp.up_proj.weight"].any()
    k = sd["model.layers.1.self_attn.k_proj.weight"]
    assert float((k - 0.0125).abs().max()) < 1e-5


def test_convert_validates_the_output_before_committing(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import converters.convert as conv
    from easyquant_vllm.format import layer_tensors as real_layer_tensors

    def corrupt(prefix, qw, meta_bits=8):  # type: ignore[no-untyped-def]
        t = real_layer_tensors(prefix, qw, meta_bits)
        if f"{prefix}.outlier_indptr" in t:  # a layer that keeps outliers (the default drops them on some)
            t[f"{prefix}.outlier_indptr"] = t[f"{prefix}.outlier_indptr"].flip(0).contiguous()  # not monotone
        return t

    monkeypatch.setattr(conv, "layer_tensors", corrupt)
    with pytest.raises(ConversionError, match=r"failed validation, nothing was written: .*outlier_indptr"):
        convert(tiny_llama, tmp_path / "eq", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_convert_fsyncs_files_and_directories_before_the_rename(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import converters.output_dir as od

    synced: list[str] = []
    real_fsync, real_rename = os.fsync, od._rename_noreplace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(a: Path, b: Path) -> None:
        synced.append(f"rename {a.name} -> {b.name}")
        real_rename(a, b)

    monkeypatch.setattr(od.os, "fsync", fsync)
    monkeypatch.setattr(od, "_rename_noreplace", rename)
    dst = tmp_path / "eq"
    convert(tiny_llama, dst, progress=False)
    rename_at = synced.index(next(s for s in synced if s.startswith("rename .eq.easyquant-tmp-")))
    before = {Path(s).name for s in synced[:rename_at]}
    assert {"model.safetensors", "config.json", "easyquant_report.json", "tokenizer.json"} <= before
    assert any(n.startswith(".eq.easyquant-tmp-") for n in before)  # the directory itself
    assert synced[rename_at].endswith("-> eq") and synced[rename_at + 1] == str(tmp_path)  # then its parent


def test_convert_nothing_after_the_commit_changes_the_exit_status(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import converters.cli as cli

    def broken(report):  # type: ignore[no-untyped-def]
        raise RuntimeError("table bug")

    monkeypatch.setattr(cli, "summary_table", broken)
    dst = tmp_path / "eq"
    assert cli_main([str(tiny_llama), str(dst), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "could not print the summary (RuntimeError: table bug)" in err
    assert validate_checkpoint(dst)["layers"] == LAYERS

    # An old checkpoint that cannot be deleted after the rename is a warning, not a failure.
    import converters.output_dir as od

    def rmtree(path, *a, **k):  # type: ignore[no-untyped-def]
        raise PermissionError("read-only")

    monkeypatch.setattr(od.shutil, "rmtree", rmtree)
    assert cli_main([str(tiny_llama), str(dst), "--no-progress", "--overwrite"]) == 0
    assert validate_checkpoint(dst)["layers"] == LAYERS


# --- the outside review's findings (each reproduced on the first version of this code) --------------------------


def test_convert_a_directory_appearing_at_dst_during_the_commit_is_refused_not_deleted(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import converters.output_dir as od

    dst = tmp_path / "eq"
    real = od.fsync_tree

    def someone_writes_dst(root: Path) -> None:  # while the output is flushed, a user creates DST
        real(root)
        dst.mkdir()
        (dst / "thesis.tex").write_text("mine")

    monkeypatch.setattr(od, "fsync_tree", someone_writes_dst)
    with pytest.raises(ConversionError, match="already exists"):
        convert(tiny_llama, dst, progress=False)
    assert _tree(dst) == {"thesis.tex": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eq"]


def test_convert_overwrite_refuses_a_checkpoint_swapped_for_other_data_during_the_commit(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import converters.output_dir as od

    dst = tmp_path / "eq"
    convert(tiny_llama, dst, ConvertOptions(format_version=1), progress=False)
    real_check = od.check_destination

    def swap_after_check(src, d, overwrite):  # type: ignore[no-untyped-def]
        checked = real_check(src, d, overwrite)
        shutil.rmtree(dst)  # between the check and the rename, DST becomes someone else's directory
        dst.mkdir()
        (dst / "config.json").write_text("{}")
        (dst / "work.txt").write_text("mine")
        return checked

    monkeypatch.setattr(od, "check_destination", swap_after_check)
    with pytest.raises(ConversionError, match="changed while the conversion ran; nothing was replaced"):
        convert(tiny_llama, dst, ConvertOptions(overwrite=True), progress=False)
    assert _tree(dst) == {"config.json": b"{}", "work.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eq"]


def test_convert_output_has_the_umask_permissions_not_private_ones(tiny_llama: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        convert(tiny_llama, tmp_path / "eq", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "eq").stat().st_mode & 0o777 == 0o755  # a server running as another user can read it


@pytest.fixture
def sigint_handler(request: pytest.FixtureRequest) -> Iterator[None]:
    """SIGINT handled as the test's parameter says (Python's KeyboardInterrupt by default), whatever the shell that
    started pytest did: a background job of a non-interactive shell, or ``nohup``, starts with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, getattr(request, "param", signal.default_int_handler))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_during_the_next_commit(src: Path, dst: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A format-1 checkpoint at ``dst`` (so that the next conversion replaces it), and a Ctrl-C sent between the
    renames of the next commit."""
    import converters.output_dir as od

    convert(src, dst, ConvertOptions(format_version=1), progress=False)
    real_exchange = od._exchange

    def interrupted(tmp, d, checked):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGINT)
        return real_exchange(tmp, d, checked)

    monkeypatch.setattr(od, "_exchange", interrupted)


@pytest.mark.usefixtures("sigint_handler")
def test_convert_interrupt_during_the_commit_is_deferred_until_it_is_complete(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "eq"
    _ctrl_c_during_the_next_commit(tiny_llama, dst, monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # delivered after the commit and its cleanup, not in between
        convert(tiny_llama, dst, ConvertOptions(overwrite=True), progress=False)
    assert read_quantization_config(dst).format_version == DEFAULT_FORMAT_VERSION
    assert validate_checkpoint(dst)["layers"] == LAYERS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eq"]  # the old checkpoint is gone, nothing stranded


@pytest.mark.parametrize("sigint_handler", [signal.SIG_IGN], indirect=True)
def test_convert_with_sigint_ignored_stays_uninterrupted(
    sigint_handler: None, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``nohup`` (SIGINT ignored) a Ctrl-C noted during the commit is dropped, as the shell asked."""
    dst = tmp_path / "eq"
    _ctrl_c_during_the_next_commit(tiny_llama, dst, monkeypatch)
    convert(tiny_llama, dst, ConvertOptions(overwrite=True), progress=False)
    assert read_quantization_config(dst).format_version == DEFAULT_FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eq"]


@pytest.mark.usefixtures("sigint_handler")
def test_cli_interrupt_or_broken_pipe_after_the_commit_exits_0(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import converters.cli as cli

    def ctrl_c_while_printing(report):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGINT)
        return "summary"

    monkeypatch.setattr(cli, "summary_table", ctrl_c_while_printing)
    assert cli_main([str(tiny_llama), str(tmp_path / "a"), "--no-progress"]) == 0
    assert "interrupted" not in capsys.readouterr().err

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise ValueError("no file")

    monkeypatch.setattr(cli, "summary_table", lambda report: "summary")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli_main([str(tiny_llama), str(tmp_path / "b"), "--no-progress"]) == 0
    monkeypatch.undo()
    assert validate_checkpoint(tmp_path / "b")["layers"] == LAYERS


@pytest.mark.parametrize("bad", ["dot", "loop"])
def test_convert_odd_destinations_are_clear_errors(bad: str, tiny_llama: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if bad == "dot":  # `easyquant-convert model .` inside an existing checkpoint: the staging must not go inside it
        dst = tmp_path / "ckpt"
        convert(tiny_llama, dst, progress=False)
        before = _tree(dst)
        monkeypatch.chdir(dst)
        convert(tiny_llama, ".", ConvertOptions(overwrite=True), progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
        assert not any(p.name.startswith(".") for p in dst.iterdir()) and _tree(dst).keys() == before.keys()
    else:
        loop = tmp_path / "loop"
        loop.symlink_to(loop)
        with pytest.raises(ConversionError, match="loop"):
            convert(tiny_llama, loop, progress=False)


def test_hf_cache_exemption_needs_a_real_hub_layout(tiny_llama: Path, tmp_path: Path) -> None:
    # Any directory named snapshots/ with a sibling blobs/ is not a hub cache: its links stay refused.
    fake = tmp_path / "w8"
    (fake / "blobs").mkdir(parents=True)
    (fake / "blobs" / "id_rsa").write_text("PRIVATE")
    snap = fake / "snapshots" / "m"
    shutil.copytree(tiny_llama, snap)
    (snap / "notes.txt").symlink_to(Path("../../blobs/id_rsa"))
    with pytest.raises(ConversionError, match="outside the model directory"):
        convert(snap, tmp_path / "out", progress=False)


def test_reader_hostile_index_and_config_are_checkpoint_errors(tiny_llama: Path, tmp_path: Path) -> None:
    from easyquant_vllm.format import CheckpointError, read_quantization_config
    from easyquant_vllm.safetensors_io import resolve_weight_files

    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x\u0000.safetensors"}}))
    with pytest.raises(CheckpointError, match="is not a path inside the model directory"):
        resolve_weight_files(d)
    (d / "model.safetensors.index.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        resolve_weight_files(d)
    for content in (b"[1, 2]", b"\xff\xfe", b'{"a": ' + b"1" * 5000 + b"}"):
        (d / "config.json").write_bytes(content)
        with pytest.raises(CheckpointError, match=r"config\.json: not a"):
            read_quantization_config(d)


def test_convert_parents_it_created_are_removed_on_failure(tiny_llama: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)

    def interrupt(name: str) -> None:  # fails once the staging directory and its parents exist
        assert (tmp_path / "b" / "c").is_dir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama, "a/../b/c/out", progress=False, on_tensor=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    convert(tiny_llama, "new/../out", progress=False)  # `..` is resolved first: no stray "new" is created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
