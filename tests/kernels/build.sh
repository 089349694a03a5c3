#!/usr/bin/env bash
# ggml's CPU kernels alone, built from the patched llama.cpp source for CPUs this machine is
# not: x86 with AVX2 but no AVX-512 (most laptops), and aarch64 three ways (NEON only, +dotprod,
# +i8mm: older and newer phones), the latter run under qemu-user by tests/test_kernels.py.
# Usage: build.sh LLAMA_CPP_SOURCE OUT -> OUT/<variant>/lib*.so and OUT/include
set -euo pipefail
src=$1 out=$2
common=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_LLAMAFILE=OFF -DGGML_OPENMP=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF)
arm=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
     -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++)
build() {  # variant, cmake flags...
    local variant=$1 tmp
    shift
    tmp=$(mktemp -d)
    cmake -S "$src" -B "$tmp" "${common[@]}" "$@" >"$tmp.log" 2>&1 &&
        cmake --build "$tmp" -j"$(nproc)" --target ggml >>"$tmp.log" 2>&1 ||
        { tail -20 "$tmp.log"; echo "building the $variant kernels failed"; exit 1; }
    mkdir -p "$out/$variant"
    cp -a "$tmp"/bin/lib*.so* "$out/$variant/"
    rm -rf "$tmp" "$tmp.log"
}
if [ "$(uname -m)" = x86_64 ]; then
    build x86-avx2 -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
fi
build arm-neon "${arm[@]}" -DGGML_CPU_ARM_ARCH=armv8-a
build arm-dotprod "${arm[@]}" -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16
build arm-i8mm "${arm[@]}" -DGGML_CPU_ARM_ARCH=armv8.6-a+dotprod+fp16+i8mm
cp -r "$src/ggml/include" "$out/include"
