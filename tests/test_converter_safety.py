"""The converter never deletes, overwrites or publishes what is not its own (issue 17), and commits only a
validated, fsynced output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from converters.cli import main as cli_main
from converters.convert import ConversionError, ConvertOptions, convert
from easyquant_vllm.format import validate_checkpoint


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
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["format_version"] == 2
    assert validate_checkpoint(dst)["layers"] == 14
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
    assert validate_checkpoint(dst)["layers"] == 14


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
    assert validate_checkpoint(tmp_path / "eq")["layers"] == 14


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

    def corrupt(prefix, qw):  # type: ignore[no-untyped-def]
        t = real_layer_tensors(prefix, qw)
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
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(a, b):  # type: ignore[no-untyped-def]
        synced.append(f"rename {Path(a).name} -> {Path(b).name}")
        real_replace(a, b)

    monkeypatch.setattr(od.os, "fsync", fsync)  # od.os is the os module: the writer's renames are seen too
    monkeypatch.setattr(od.os, "replace", replace)
    dst = tmp_path / "eq"
    convert(tiny_llama, dst, progress=False)
    rename = synced.index(next(s for s in synced if s.startswith("rename .eq.easyquant-tmp-")))
    before = {Path(s).name for s in synced[:rename]}
    assert {"model.safetensors", "config.json", "easyquant_report.json", "tokenizer.json"} <= before
    assert any(n.startswith(".eq.easyquant-tmp-") for n in before)  # the directory itself
    assert synced[rename].endswith("-> eq") and synced[rename + 1] == str(tmp_path)  # then its parent


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
    assert validate_checkpoint(dst)["layers"] == 14

    # An old checkpoint that cannot be deleted after the rename is a warning, not a failure.
    import converters.output_dir as od

    def rmtree(path, *a, **k):  # type: ignore[no-untyped-def]
        raise PermissionError("read-only")

    monkeypatch.setattr(od.shutil, "rmtree", rmtree)
    assert cli_main([str(tiny_llama), str(dst), "--no-progress", "--overwrite"]) == 0
    assert validate_checkpoint(dst)["layers"] == 14
