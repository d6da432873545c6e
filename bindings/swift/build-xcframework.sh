#!/usr/bin/env bash
# Builds PocketLMCore.xcframework (static libpocketlm_capi.a + pocketlm.h) for macOS and iOS
# (device and simulator), for a `.binaryTarget` in an app's package. macOS with Xcode and the
# rustup targets aarch64-apple-ios, aarch64-apple-ios-sim, aarch64-apple-darwin. UNTESTED (no
# macOS here).
set -euo pipefail
cd "$(dirname "$0")/../.."
for t in aarch64-apple-darwin aarch64-apple-ios aarch64-apple-ios-sim; do
  cargo build --release -p pocketlm-capi --target "$t"
done
hdr=$(mktemp -d)
cp crates/pocketlm-capi/include/pocketlm.h "$hdr/"
cat > "$hdr/module.modulemap" <<'MAP'
module CPocketLM {
    header "pocketlm.h"
    export *
}
MAP
rm -rf bindings/swift/PocketLMCore.xcframework
xcodebuild -create-xcframework \
  -library target/aarch64-apple-darwin/release/libpocketlm_capi.a -headers "$hdr" \
  -library target/aarch64-apple-ios/release/libpocketlm_capi.a -headers "$hdr" \
  -library target/aarch64-apple-ios-sim/release/libpocketlm_capi.a -headers "$hdr" \
  -output bindings/swift/PocketLMCore.xcframework
echo "wrote bindings/swift/PocketLMCore.xcframework"
