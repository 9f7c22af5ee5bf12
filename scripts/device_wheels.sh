#!/usr/bin/env bash
# Wheels for the GPU acceptance run (python -m lm.gpu_acceptance) on a lent H200 machine that has no
# network: its image has Python 3.12 with torch, triton, pytorch-lightning and most of our
# dependencies, but not the few listed below. This script puts cp312 manylinux x86-64 wheels of
# exactly those into .whl/ (ignored by git; the device call carries it). docs/gpu-device.md has the
# one-call recipe.
#
#   scripts/device_wheels.sh          download/build the wheels into .whl/, prune others, check, print the size
#   scripts/device_wheels.sh --check  only check .whl/ (one wheel per package, cp312 tags, every
#                                     Requires-Dist met by a carried wheel or by the device image)
#   scripts/device_wheels.sh --env    ON THE DEVICE, after installing the wheels: the versions that the
#                                     acceptance run will import against pyproject.toml's ranges and the
#                                     carried wheels' requirements (reports only; exits 0)
#
# How the list was chosen: the acceptance run (its --cpu-smoke, a CPU `lm train` under DeepSpeed
# ZeRO-2, and an import of the fla ops that kernels/ uses) was run here with every imported
# top-level module recorded, in the parent and in the `lm train` subprocesses; the imported
# distributions that the device image lacks are carried, with their own requirements that it
# lacks. Not imported (so not carried): datasets, wandb. In the image (versions unchecked here, see
# --env): einops, matplotlib, rich, tensorboard, tqdm, typer, pyarrow.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
MAX_MIB=${MAX_MIB:-40}

# name==version  # who imports it
WHEELS=(
    omegaconf==2.4.0          # lm.config (needs PyYAML: in the image)
    torchdata==0.11.0         # data.datamodule (needs requests, urllib3: in the image)
    fla-core==0.6.0           # kernels' backend="fla" (kernel timings against fla; needs einops)
    hjson==3.1.0              # deepspeed
    pydantic==2.14.4          # deepspeed (its config models)
    pydantic-core==2.50.5     # pydantic pins it exactly (the one binary wheel)
    annotated-types==0.8.0    # pydantic
    typing-inspection==0.4.5  # pydantic
    typing-extensions==4.16.0 # pydantic and pydantic-core need >= 4.16.0; the image's version is not known
)
# Only an sdist on the index: built here, pure Python (py3-none-any), no ops compiled (DS_BUILD_OPS=0;
# the acceptance's ZeRO-2 run on CUDA uses the torch optimizer and needs no DeepSpeed op)
SDISTS=(
    deepspeed==0.19.8         # lm train train.strategy=deepspeed (pytorch_lightning's DeepSpeedStrategy)
)

# The device image's Python packages (the H200 kind's image, package list read 2026-11-17), and the
# versions known from a pip list there; used by --check to decide what need not travel.
DEVICE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
DEVICE_VERSIONS="accelerate==1.15.0 huggingface-hub==1.33.0 numpy==2.5.2 pytorch-lightning==2.6.6
safetensors==0.8.0 tokenizers==0.23.2 torch==2.11.0 torchmetrics==1.9.0 transformers==5.17.0 triton==3.6.0"

PLATFORMS=(
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)

# --check: the carried wheels against each other and the device image (runs here, with packaging)
check() {
    local py=${PYTHON:-.venv/bin/python}
    [[ -x $py ]] || py=python3
    local tmp
    tmp=$(mktemp -d)
    # pip itself: every wheel installable for CPython 3.12 on manylinux x86-64, no two of one package
    "$py" -m pip install --dry-run -q --no-index --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" --target "$tmp/site" "$DEST"/*.whl
    rm -rf "$tmp"
    EXPECTED="${WHEELS[*]} ${SDISTS[*]}" DEVICE_PACKAGES="$DEVICE_PACKAGES" DEVICE_VERSIONS="$DEVICE_VERSIONS" \
        DEST="$DEST" "$py" - <<'EOF'
import email.parser
import os
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

# the device: CPython 3.12.3 on Linux x86-64
ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
expected = {canonicalize_name(s.split("==")[0]): s.split("==")[1] for s in os.environ["EXPECTED"].split()}
device = {canonicalize_name(n) for n in os.environ["DEVICE_PACKAGES"].split()}
device_versions = {canonicalize_name(s.split("==")[0]): s.split("==")[1] for s in os.environ["DEVICE_VERSIONS"].split()}
problems = []
carried = {}
for whl in sorted(Path(os.environ["DEST"]).glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(whl.name)
    if name in carried:
        problems.append(f"two wheels of {name}: {carried[name][0]} and {version}")
    if not any(
        t.interpreter in ("py3", "cp312")
        and (t.platform == "any" or "manylinux" in t.platform and t.platform.endswith("x86_64"))
        for t in tags
    ):
        problems.append(f"{whl.name}: no tag for CPython 3.12 on manylinux x86-64")
    with zipfile.ZipFile(whl) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
        tops = {n.split("/")[0].removesuffix(".py") for n in z.namelist()}  # packages and single modules
    if tops & {"lm", "data", "kernels"}:
        problems.append(
            f"{whl.name} ships a top-level {sorted(tops & {'lm', 'data', 'kernels'})} (shadows the project)"
        )
    rp = meta.get("Requires-Python")
    if rp and "3.12.3" not in SpecifierSet(rp):
        problems.append(f"{whl.name}: Requires-Python {rp} excludes 3.12")
    carried[name] = (str(version), [Requirement(r) for r in meta.get_all("Requires-Dist") or []])

for name, version in expected.items():
    if name not in carried:
        problems.append(f"missing wheel: {name}=={version}")
    elif carried[name][0] != version:
        problems.append(f"{name}: carried {carried[name][0]}, pinned {version}")
for name in carried:
    if name not in expected:
        problems.append(f"unexpected wheel: {name} (not in the script's list)")
    if name in device:
        print(f"  note: {name} is also in the image; the carried {carried[name][0]} shadows it")

print(f"{'wheel':<22} {'requirement':<34} met by")
for name, (version, reqs) in sorted(carried.items()):
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue  # an extra, or another platform / Python
        dep = canonicalize_name(req.name)
        if dep in carried:
            ok = carried[dep][0] in req.specifier or not str(req.specifier)
            by = f"carried {carried[dep][0]}"
        elif dep in device:
            known = device_versions.get(dep)
            ok = known is None or known in req.specifier
            by = f"image {known or '(version not known here)'}"
            if known is None and str(req.specifier):
                by += "  <- checked on the device by --env"
        else:
            ok, by = False, "NOTHING: neither carried nor in the image"
        print(f"{name + ' ' + version:<22} {str(req):<34} {by}")
        if not ok:
            problems.append(f"{name} {version} needs {req}: {by}")
if problems:
    print("\n".join(["PROBLEMS:"] + [f"  - {p}" for p in problems]))
    sys.exit(1)
print(f"check: {len(carried)} wheels, one per package, cp312-compatible, every requirement met")
EOF
}

# --env: on the device (python3 there, PYTHONPATH=/tmp/site), what the run will import against the ranges
env_report() {
    local py=${PYTHON:-python3}
    CARRIED="${WHEELS[*]} ${SDISTS[*]}" "$py" - <<'EOF'
import importlib.metadata as md
import os
import sys
import tomllib

try:
    from packaging.requirements import Requirement
except ImportError:  # report the versions alone
    Requirement = None

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["fla"] + project["optional-dependencies"]["gpu"]
NOT_IMPORTED = {"datasets", "wandb"}  # by the acceptance run (not carried)
print(f"python {sys.version.split()[0]} at {sys.executable}")
bad = 0
print("pyproject.toml's requirements (dependencies, fla, gpu):")
for line in reqs:
    name = Requirement(line).name if Requirement else line.split(">")[0].split("=")[0].split("<")[0]
    try:
        dist = md.distribution(name)
        version, where = dist.version, str(dist.locate_file(""))
    except md.PackageNotFoundError:
        version, where = None, ""
    if version is None:
        status = "absent (not imported by the acceptance)" if name in NOT_IMPORTED else "ABSENT"
    elif Requirement is None:
        status = "?"
    else:
        status = "ok" if Requirement(line).specifier.contains(version, prereleases=True) else "OUTSIDE RANGE"
    bad += status in ("ABSENT", "OUTSIDE RANGE")
    print(f"  {line:<28} {version or '-':<14} {status:<16} {where}")
print("the carried wheels' requirements:")
ENV = {"extra": ""}
for name in os.environ.get("CARRIED", "").split():
    name = name.split("==")[0]
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        print(f"  carried {name}: NOT INSTALLED")
        bad += 1
        continue
    for line in dist.requires or []:
        if Requirement is None:
            break
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        ok = have is not None and req.specifier.contains(have, prereleases=True)
        bad += not ok
        print(f"  {name + ' ' + dist.version + ' needs ' + str(req):<56} {have or '-':<14} {'ok' if ok else 'NOT MET'}")
print(f"env: {bad} problem(s)" + ("" if not bad else " (the run goes on; see above)"))
EOF
}

case "${1:-}" in
    --check) check; exit ;;
    --env) env_report; exit ;;
    "") ;;
    *) echo "usage: $0 [--check | --env]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
for spec in "${SDISTS[@]}"; do
    name=${spec%%==*}
    version=${spec##*==}
    if ! compgen -G "$DEST/${name//-/_}-${version}-py3-none-any.whl" >/dev/null; then
        echo "building ${spec} (sdist only on the index) ..."
        log=$(mktemp)
        if ! DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-binary "$name" \
            -w "$DEST" "$spec" >"$log" 2>&1; then
            tail -30 "$log" >&2
            exit 1
        fi
        rm -f "$log"
    fi
done
# one version per package: drop any wheel the lists above do not name (an older pin, say)
keep=()
for spec in "${WHEELS[@]}" "${SDISTS[@]}"; do
    name=${spec%%==*}
    keep+=("${name//-/_}-${spec##*==}-")
done
for whl in "$DEST"/*.whl; do
    base=$(basename "$whl")
    ok=0
    for prefix in "${keep[@]}"; do
        # wheel file names spell the project name with underscores, any case
        [[ ${base,,} == "${prefix,,}"* ]] && ok=1
    done
    if [[ $ok == 0 ]]; then
        echo "removing $base (not in the list)"
        rm -f "$whl"
    fi
done
rm -f "$DEST"/*.tar.gz

check
ls -l "$DEST"
wheels=("$DEST"/*.whl)
bytes=$(cat "${wheels[@]}" | wc -c)
echo "total: $(( (bytes + 1048575) / 1048576 )) MiB ($bytes bytes) in ${#wheels[@]} wheels"
if (( bytes > MAX_MIB * 1048576 )); then
    echo "too large: over ${MAX_MIB} MiB (the device call carries at most 64 MiB with the working tree)" >&2
    exit 1
fi
