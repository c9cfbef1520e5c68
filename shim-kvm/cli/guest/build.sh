#!/bin/sh
# Reassembles the demo guest. CI does not run this: demo.bin is committed and
# embedded with include_bytes! (shim-kvm/src/guest.rs); a unit test checks the
# committed bytes against demo.asm whenever nasm is installed.
set -eu
cd "$(dirname "$0")"
nasm -f bin -o demo.bin demo.asm
