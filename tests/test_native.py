"""The compiled kernels' shared cache: where a build is kept, what its name depends on, and that keeping it is atomic."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from edgesnn import crossbar_readout, native, neuron_kernel


@pytest.fixture
def fake_compiler(tmp_path):
    """A stand-in compiler file: the key reads its path, size and modification time, never runs it."""
    path = tmp_path / "bin" / "cc"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_cache_folder_prefers_edgesnn_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("EDGESNN_CACHE_DIR", raising=False)
    assert native.cache_folder() == str(tmp_path / "xdg" / "edgesnn")
    monkeypatch.setenv("EDGESNN_CACHE_DIR", str(tmp_path / "mine"))
    assert native.cache_folder() == str(tmp_path / "mine")
    monkeypatch.setenv("EDGESNN_CACHE_DIR", "relative/folder")
    assert native.cache_folder() is None and native.cached_path("neuron", shutil.which("sh"), "source") is None


def test_a_changed_source_flag_or_compiler_gets_a_new_name(tmp_path, monkeypatch, fake_compiler) -> None:
    if not native.cpu_description():
        pytest.skip("no /proc/cpuinfo: no key can be formed")
    monkeypatch.setenv("EDGESNN_CACHE_DIR", str(tmp_path / "cache"))
    first = native.cached_path("neuron", str(fake_compiler), b"int f(void);", "-O3")
    assert first is not None and os.path.dirname(first) == str(tmp_path / "cache") and os.path.basename(first).startswith("neuron-")
    assert native.cached_path("neuron", str(fake_compiler), b"int f(void);", "-O3") == first  # the same inputs: the same file
    assert native.cached_path("neuron", str(fake_compiler), b"int g(void);", "-O3") != first
    assert native.cached_path("neuron", str(fake_compiler), b"int f(void);", "-O2") != first
    assert native.cached_path("readout", str(fake_compiler), b"int f(void);", "-O3") != first
    # An upgraded compiler (same path, new file) must not load a library the old one built.
    before = fake_compiler.stat()
    os.utime(fake_compiler, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert native.cached_path("neuron", str(fake_compiler), b"int f(void);", "-O3") != first
    assert native.cached_path("neuron", str(tmp_path / "bin" / "missing"), b"int f(void);") is None


def test_keep_is_atomic_and_leaves_nothing_where_it_cannot_write(tmp_path) -> None:
    built = tmp_path / "built.so"
    built.write_bytes(b"\x7fELF library")
    target = tmp_path / "cache" / "neuron-key.so"
    assert native.keep(str(built), str(target))
    assert target.read_bytes() == built.read_bytes() and [path.name for path in target.parent.iterdir()] == [target.name]
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    assert not native.keep(str(built), str(blocked / "neuron-key.so"))
    missing = tmp_path / "gone.so"
    assert not native.keep(str(missing), str(target.parent / "other.so"))
    assert [path.name for path in target.parent.iterdir()] == [target.name]  # no .partial left behind


def test_cc_names_the_compiler(monkeypatch, fake_compiler) -> None:
    monkeypatch.setenv("CC", str(fake_compiler))
    assert native.compiler() == str(fake_compiler)
    monkeypatch.setenv("CC", str(fake_compiler.parent / "missing"))
    assert native.compiler() is None


def test_both_kernels_share_one_cache_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESNN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EDGESNN_NEURON_KERNEL", raising=False)
    try:
        neuron_kernel.library.cache_clear()
        if neuron_kernel.library() is None or crossbar_readout._compile() is None:
            pytest.skip("no C compiler")
        names = sorted(path.name.split("-")[0] for path in tmp_path.iterdir())
        assert names == ["neuron", "readout"]
    finally:
        monkeypatch.undo()
        neuron_kernel.library.cache_clear()


def test_a_cached_library_that_does_not_load_is_built_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESNN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EDGESNN_NEURON_KERNEL", raising=False)
    try:
        neuron_kernel.library.cache_clear()
        if neuron_kernel.library() is None:
            pytest.skip("no C compiler")
        (cached,) = tmp_path.glob("neuron-*.so")
        # A truncated or foreign file under the right name (a new file: the loaded one stays mapped as it was).
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"not a shared library")
        os.replace(garbage, cached)
        neuron_kernel.library.cache_clear()
        assert neuron_kernel.library() is not None
        assert cached.read_bytes()[:4] == b"\x7fELF" and [path.name for path in tmp_path.iterdir()] == [cached.name]
    finally:
        monkeypatch.undo()
        neuron_kernel.library.cache_clear()
