"""``make gpu-wheels`` / ``make gpu-check`` (scripts/gpu_check.sh), tested here without a GPU: the install from the wheel
folder is offline (``pip --no-index --no-deps``, no pip configuration of the machine) and never installs torch, bad
folders are refused before anything is installed, the wheels plus the GPU image's packages are all that the cuda tests
and bench-gpu import, and brainfm.bench.torch_features reports what the running torch lacks."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from brainfm.bench import torch_features
from brainfm.config import repo_root

ROOT = repo_root()
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

#: the Python packages of the GPU machines' image ('cuda'), as /work/.library/device/KINDS.md lists them (read there
#: on 2026-11-17); the cuda tests and bench-gpu may import these and the wheels of `make gpu-wheels`, nothing else
IMAGE_PACKAGES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
    fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
    joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
    mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
    nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
    pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
    tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()


def make_wheel(folder: Path, name: str, version: str, modules: dict[str, str], requires: tuple[str, ...] = (),
               tag: str = "py3-none-any") -> Path:
    """A minimal, valid wheel ``<name>-<version>-<tag>.whl`` in ``folder`` holding ``modules`` (path -> text)."""
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    files = {
        **modules,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
        z.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in files) + f"{info}/RECORD,,\n")
    return path


@pytest.fixture
def wheel_folder(tmp_path) -> Path:
    """A brainfm wheel that declares torch (as the real one does) and a stand-in dependency."""
    folder = tmp_path / "wheels"
    make_wheel(folder, "brainfm", "0.1.0", {"brainfm/__init__.py": "__version__ = '0.1.0'\nMARK = 'from the wheel'\n"},
               requires=("torch==2.13.0", "hydra-core>=1.3,<1.4"))
    make_wheel(folder, "hydra-core", "1.3.8", {"hydra/__init__.py": "MARK = 'tiny hydra'\n"})
    return folder


def gpu_check(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "BRAINFM_CUDA"))}
    full.update({"PYTHON": sys.executable, **(env or {})})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_prints_an_offline_no_deps_install_of_exactly_the_folder(wheel_folder):
    out = gpu_check("--dry-run", env={"GPU_CHECK_WHEELS": str(wheel_folder)})
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("install: ")]
    cmd = shlex.split(line.removeprefix("install: "))
    pip = cmd[cmd.index("pip"):]
    assert pip[:2] == ["pip", "install"] and {"--no-index", "--no-deps"} <= set(pip)
    # the machine's pip configuration (find-links, constraints) is off: no file, every PIP_* variable unset
    prefix = cmd[:cmd.index("pip")]
    assert "PIP_CONFIG_FILE=/dev/null" in prefix
    assert [v for v in prefix if "=" in v] == ["PIP_CONFIG_FILE=/dev/null"]
    unset = {prefix[i + 1] for i, v in enumerate(prefix) if v == "-u"}
    assert {k for k in os.environ if k.startswith("PIP_")} <= unset
    targets = [a for a in pip[2:] if not a.startswith("-")]
    wheels = [a for a in targets if a.endswith(".whl")]
    assert sorted(wheels) == sorted(str(p) for p in wheel_folder.glob("*.whl"))
    assert set(targets) - set(wheels) == {pip[pip.index("--target") + 1]}  # nothing but the folder's files
    assert not any("torch" in a for a in pip)
    assert re.search(r"^pytest: .*-m cuda tests/test_cuda\.py", out.stdout, re.M)
    assert re.search(r"^bench: .*scripts/bench_gpu\.py --only gpt .*--sizes 202m", out.stdout, re.M)
    assert re.search(r"^bench: .*scripts/bench_gpu\.py --only swin4d_v9 .*--sizes 202m", out.stdout, re.M)


def test_install_only_installs_the_folder_offline_and_never_torch(wheel_folder, tmp_path):
    """brainfm's wheel requires torch==2.13.0 and a find-links folder offers a torch wheel: neither brings torch in."""
    links = tmp_path / "links"
    make_wheel(links, "torch", "2.13.0", {"torch/__init__.py": "raise ImportError('the fake torch was installed')\n"})
    site = tmp_path / "site"
    out = gpu_check("--install-only", env={"GPU_CHECK_WHEELS": str(wheel_folder), "GPU_CHECK_SITE": str(site),
                                            "PIP_FIND_LINKS": str(links), "PIP_INDEX_URL": "http://127.0.0.1:9/none"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "from the wheel" in (site / "brainfm" / "__init__.py").read_text()
    assert (site / "hydra" / "__init__.py").is_file()
    assert not (site / "torch").exists() and not list(site.glob("torch-*"))
    assert f"from {site}/brainfm/__init__.py" in out.stdout
    assert f"torch {torch.__version__} from {Path(torch.__file__).parent}" in out.stdout  # the environment's own


@pytest.mark.parametrize("bad, message", [
    ("torch", "never a wheel of it"),
    ("nvidia-cudnn-cu13", "never a wheel of it"),
    ("platform", "not a pure-Python wheel"),
    ("no brainfm", "exactly one brainfm wheel"),
    ("empty", "holds no wheels"),
    ("missing", "make gpu-wheels"),
])
def test_bad_wheel_folders_are_refused_before_anything_is_installed(wheel_folder, tmp_path, bad, message):
    folder = wheel_folder
    if bad in ("torch", "nvidia-cudnn-cu13"):
        make_wheel(folder, bad, "2.13.0", {"x/__init__.py": ""})
    elif bad == "platform":
        make_wheel(folder, "numpy", "2.4.6", {"numpy/__init__.py": ""}, tag="cp311-cp311-manylinux_2_17_x86_64")
    elif bad == "no brainfm":
        next(folder.glob("brainfm-*.whl")).unlink()
    elif bad == "empty":
        for p in folder.glob("*.whl"):
            p.unlink()
    else:
        folder = tmp_path / "nowhere"
    site = tmp_path / "site"
    for mode in ("--install-only", "--dry-run"):
        out = gpu_check(mode, env={"GPU_CHECK_WHEELS": str(folder), "GPU_CHECK_SITE": str(site)})
        assert out.returncode == 2 and message in out.stderr, (mode, out.stdout, out.stderr)
        assert out.stderr.count("\n") == 1  # one clear line, no traceback
    assert not site.exists()


def test_unknown_argument_and_a_reused_site_are_refused(wheel_folder, tmp_path):
    out = gpu_check("--prepar")
    assert out.returncode == 2 and "unknown argument '--prepar'" in out.stderr
    (tmp_path / "site").mkdir()
    out = gpu_check("--install-only", env={"GPU_CHECK_WHEELS": str(wheel_folder), "GPU_CHECK_SITE": str(tmp_path / "site")})
    assert out.returncode == 2 and "exists already" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_check_refuses_to_run_without_a_gpu(wheel_folder, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = gpu_check(env={"GPU_CHECK_WHEELS": str(wheel_folder), "OUT": str(tmp_path / "out"), "TMPDIR": str(scratch)})
    assert out.returncode == 2 and "no CUDA device" in out.stderr and "--dry-run" in out.stderr
    assert not (tmp_path / "out").exists() and not list(scratch.iterdir())  # nothing written, nothing left behind


def test_cuda_tests_live_in_test_cuda_py():
    """gpu_check runs `pytest -m cuda tests/test_cuda.py` (collecting the whole suite would import packages the GPU
    image lacks): a cuda test anywhere else would never run."""
    elsewhere = [p.name for p in (ROOT / "tests").glob("test_*.py")
                 if p.name != "test_cuda.py" and re.search(r"mark\.cuda\b", p.read_text())]
    assert not elsewhere
    assert re.search(r"^pytestmark = pytest\.mark\.cuda$", (ROOT / "tests" / "test_cuda.py").read_text(), re.M)


# the GPU image plus the wheels: every other top-level package installed here is made absent in the subprocess, as it
# is there (``sys.modules[name] = None``: ``import name`` raises ModuleNotFoundError, ``importlib.util.find_spec`` gives
# None, so libraries' optional imports take their fallbacks as they would there)
_BLOCKER = r"""
import importlib.metadata, json, os, pkgutil, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
allowed = {norm(n) for n in json.loads(os.environ["ALLOWED"])}
owners = importlib.metadata.packages_distributions()
blocked = sorted({m.name for m in pkgutil.iter_modules()
                  if re.search(r"(site|dist)-packages", str(getattr(m.module_finder, "path", "")))
                  and m.name in owners and not {norm(d) for d in owners[m.name]} & allowed})
for name in blocked:
    sys.modules[name] = None
import pytest
code = pytest.main(sys.argv[1:])
print("BLOCKED", json.dumps(blocked))
sys.exit(code)
"""


def _under_the_image(*pytest_args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[str]]:
    wheels = subprocess.run(["bash", str(SCRIPT), "--list-packages"], capture_output=True, text=True, check=True)
    allowed = [*IMAGE_PACKAGES, *wheels.stdout.split(), "brainfm"]
    # plugin autoload off: pytest would look up the entry-point plugins of every installed distribution, blocked too
    env = {**os.environ, "ALLOWED": json.dumps(allowed), "BRAINFM_CUDA_TESTS_ON_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", _BLOCKER, "-p", "no:cacheprovider", "-q", "-m", "cuda",
                          "tests/test_cuda.py", *pytest_args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("BLOCKED ")]
    return out, json.loads(line.removeprefix("BLOCKED "))


def test_the_cuda_tests_need_only_the_gpu_image_and_the_wheels():
    """tests/test_cuda.py imports brainfm.bench.gpu, the models, tasks, training, Lightning and Hydra: with every package
    that is neither on the GPU image nor among `make gpu-wheels`' wheels made absent, it collects, and the tests that
    run on a CPU (BRAINFM_CUDA_TESTS_ON_CPU) pass, so nothing they import at run time is missing there either (Hydra's
    instantiate, Lightning's fit, safetensors). The compiled ones are left out (~75 s of Inductor on 2 cores); what
    they add is torch's own compiler. Optional imports that libraries handle (pandas' numexpr, torch's dill) are absent as they are there."""
    out, blocked = _under_the_image("-k", "not compiled")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert re.search(r"\d+ passed", out.stdout) and "error" not in out.stdout.splitlines()[-2], out.stdout[-2000:]
    assert {"monai", "deepspeed", "optuna", "webdataset", "captum"} <= set(blocked)  # what the image lacks
    assert not {"hydra", "omegaconf", "antlr4", "nibabel", "brainfm", "torch", "lightning"} & set(blocked)


@pytest.mark.slow
def test_prepare_builds_a_pure_python_folder_within_the_carry_limit(tmp_path):
    """`make gpu-wheels` for real (the registry): brainfm's wheel from this tree plus the listed packages at the versions
    installed here, pure Python, no torch, the parity fixture beside them, a manifest, under 64 MiB; then it installs."""
    folder = tmp_path / "wheels"
    out = gpu_check("--prepare", env={"GPU_CHECK_WHEELS": str(folder)}, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    names = sorted(p.name for p in folder.glob("*.whl"))
    packages = gpu_check("--list-packages").stdout.split()
    assert len(names) == 1 + len(packages) and any(n.startswith("brainfm-0.1.0-") for n in names)
    for pkg in packages:
        assert f"{pkg.replace('-', '_')}-{version(pkg)}-py3-none-any.whl" in names
    assert not any(n.lower().startswith(("torch", "nvidia", "triton")) for n in names)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 64 * 2**20 and re.search(r"\d+\.\d MiB in all", out.stdout)
    assert all(n in (folder / "MANIFEST.txt").read_text() for n in names)
    assert not list(tmp_path.glob("wheels.tmp.*"))  # nothing half-written left beside it
    site = tmp_path / "site"
    out = gpu_check("--install-only", env={"GPU_CHECK_WHEELS": str(folder), "GPU_CHECK_SITE": str(site)})
    assert out.returncode == 0 and (site / "brainfm" / "bench" / "torch_features.py").is_file(), out.stderr


# -- brainfm.bench.torch_features ------------------------------------------------------------------------------
def test_torch_features_report_this_torch_and_the_pin():
    text = torch_features.report()
    assert text.startswith(f"torch {torch.__version__} (")
    assert "brainfm pins torch 2.13.0" in text  # pyproject.toml's pin, read from the installed metadata
    for f in torch_features.FEATURES:
        assert re.search(rf"^\| `{re.escape(f.api)}` \| .* \| {re.escape(f.since)} \| (yes|MISSING: .+) \|$", text, re.M)
    with pytest.raises(KeyError, match="unknown torch feature 'flash'"):
        torch_features.missing("flash")


def test_a_missing_feature_is_named_with_its_release_and_an_older_torch_is_said(monkeypatch):
    gone = dataclasses.replace(torch_features._BY_KEY["flex_attention"], probe=lambda: "no such module")
    monkeypatch.setitem(torch_features._BY_KEY, "flex_attention", gone)
    monkeypatch.setattr(torch_features, "FEATURES", tuple(gone if f.key == "flex_attention" else f
                                                          for f in torch_features.FEATURES))
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    why = torch_features.missing("flex_attention")
    assert why == ("torch 2.11.0+cu130 lacks torch.nn.attention.flex_attention (since torch 2.5): no such module")
    text = torch_features.report()
    assert "older than the pin" in text and "MISSING: no such module" in text
    assert text.rstrip().endswith("missing, their tests skipped: flex_attention")
