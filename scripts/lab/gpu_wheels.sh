#!/usr/bin/env bash
# Collect the wheels verl 0.9.1's SFT path needs on a GPU machine that has torch but no internet
# (Python 3.12, x86_64), for scripts/lab/gpu_sft_proof.py and scripts/lab/mini_grpo.py. Writes .whl/ (everything but ray) and
# .whl2/ray.part-aa, .whl3/ray.part-ab (ray's wheel split in parts, so that each transfer stays under
# a 64 MiB limit). On the GPU machine:
#   cat .whl2/ray.part-* .whl3/ray.part-* > ray.whl && pip install --no-deps --target /tmp/site .whl/*.whl ray.whl
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64)
mkdir -p .whl .whl2 .whl3 /tmp/ray-dl
# versions: what verl 0.9.1 resolves to on our CPU install; transformers/tokenizers below the GPU image's
# (verl needs transformers < 5.11)
for pkg in verl==0.9.1 hydra-core==1.3.8 omegaconf==2.3.1 tensordict==0.10.0 pyvers==0.1.0 orjson==3.13.0 \
    importlib_metadata transformers==5.10.4 tokenizers==0.22.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    codetiming==1.4.0 torchdata==0.11.0 cachetools fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 \
    pydantic_core==2.50.4 annotated_types typing_inspection uvicorn pyzmq msgspec jsonschema \
    jsonschema_specifications referencing rpds_py fsspec==2026.9.0 regex; do
  "$PY" -m pip download -q "${plat[@]}" -d .whl "$pkg"
done
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 pylatexenc==2.11   # sdist-only
"$PY" -m pip download -q "${plat[@]}" -d /tmp/ray-dl ray==2.60.0
split -b 30m /tmp/ray-dl/ray-*.whl /tmp/ray-dl/ray.part-
mv /tmp/ray-dl/ray.part-aa .whl2/ && mv /tmp/ray-dl/ray.part-a[b-z] .whl3/
du -sh .whl .whl2 .whl3
# The GRPO loop (scripts/lab/mini_grpo.py) also needs verl's transfer queue, the reward's math-verify,
# the tool's aiohttp client, what our sandbox server and launcher use, and liger-kernel (--extra model.use_liger=true): .whl5/.
mkdir -p .whl5
for pkg in transferqueue==0.1.11 prometheus_client math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
    aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl attrs httpx httpcore h11 anyio \
    psutil idna certifi sniffio liger-kernel==0.8.5; do
  "$PY" -m pip download -q "${plat[@]}" -d .whl5 "$pkg"
done
du -sh .whl5
