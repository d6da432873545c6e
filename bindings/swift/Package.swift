// swift-tools-version:5.9
// PocketLM for Swift: a thin class over pocketlm's C API (crates/pocketlm-capi/include/pocketlm.h).
//
// UNTESTED: no Swift toolchain was available where this was written (see README.md). The C API
// it wraps is tested (crates/pocketlm-capi/tests/it).
//
// Link against libpocketlm_capi built by cargo:
//   cargo build --release -p pocketlm-capi
//   swift build -Xlinker -L../../target/release        (macOS / Linux, from this folder)
// For an iOS / macOS app, build an XCFramework with build-xcframework.sh and swap the
// `CPocketLM` target for a `.binaryTarget` (see README.md).
import PackageDescription

let package = Package(
    name: "PocketLM",
    platforms: [.macOS(.v13), .iOS(.v16)],
    products: [
        .library(name: "PocketLM", targets: ["PocketLM"]),
    ],
    targets: [
        // The C header as a Swift module; links `pocketlm_capi` (module.modulemap).
        .systemLibrary(name: "CPocketLM", path: "Sources/CPocketLM"),
        .target(name: "PocketLM", dependencies: ["CPocketLM"], path: "Sources/PocketLM"),
    ]
)
