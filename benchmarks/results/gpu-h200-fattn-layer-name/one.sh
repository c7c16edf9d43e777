#!/bin/bash
set -x
export PATH=$PATH:/usr/local/cuda/bin
R=$PWD; W=/tmp/w; mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .dev/c8/whl/*.whl
tar xJf .dev/c8/lcp.tar.xz -C $W
t0=$(date +%s)
(cd $W/llama_cpp_python-0.3.36 && CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=off" CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel --no-build-isolation --no-deps . -w $W/wheel > $W/pipwheel.log 2>&1) || { tail -c 2000 $W/pipwheel.log; exit 3; }
echo "build $(( $(date +%s) - t0 )) s"
python3 -m pip install -q --no-deps --no-index --force-reinstall $W/wheel/llama_cpp_python-*.whl
cmake -S . -B $W/pme -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(which python3) > $W/pme.log 2>&1 && cmake --build $W/pme >> $W/pme.log 2>&1 || { tail -30 $W/pme.log; exit 4; }
mkdir -p $W/old && cp -r CMakeLists.txt native pymorph_edge $W/old/ && cp .dev/c8/old_callback.c $W/old/native/pme_callback.c
cmake -S $W/old -B $W/pmeold -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(which python3) > $W/pmeold.log 2>&1 && cmake --build $W/pmeold >> $W/pmeold.log 2>&1 || { tail -30 $W/pmeold.log; exit 5; }
export PYTHONPATH=$R PYTHONUNBUFFERED=1
python3 -c "
from pymorph_edge.model.synthetic_gguf import write_synthetic_llama as w
w('$W/gqa.gguf', n_head=8, n_head_kv=2, n_layer=2, n_embd=128, n_ff=256)
w('$W/gemma.gguf', n_head=4, n_head_kv=1, n_layer=6, n_embd=128, n_ff=256, arch='gemma3', n_swa=32)
"
for m in gqa gemma; do
  echo "== $m before (HEAD)"; PME_LIBRARY_DIR=$W/pmeold timeout 60 python3 benchmarks/_diag2.py $W/$m.gguf 2>&1 | grep -E "^OK|^FAIL" | tee -a $OUT/diag.log
  echo "== $m after (fattn_layer reads the scheduler's copy)"; PME_LIBRARY_DIR=$W/pme timeout 60 python3 benchmarks/_diag2.py $W/$m.gguf 2>&1 | grep -E "^OK|^FAIL" | tee -a $OUT/diag.log
done
