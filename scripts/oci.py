#!/usr/bin/env python3
"""`make oci`: packages apikeyrouter.wasm as an OCI artifact, the format Istio's
WasmPlugin pulls (`url: oci://...`), without Docker.

It writes an OCI image layout to dist/oci/ (and dist/apikeyrouter-oci.tar):
one layer of media type application/vnd.module.wasm.content.layer.v1+wasm
holding the module, and a config of application/vnd.module.wasm.config.v1+json.
Push it with any OCI client, for example:

    oras cp --from-oci-layout dist/oci:0.1.0 registry.example.com/apikeyrouter:0.1.0
    skopeo copy oci:dist/oci:0.1.0 docker://registry.example.com/apikeyrouter:0.1.0
"""

import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "apikeyrouter.wasm"
OUT = ROOT / "dist" / "oci"


def version():
    for line in (ROOT / "Cargo.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split('"')[1]
    return "0.0.0"


def blob(data):
    digest = hashlib.sha256(data).hexdigest()
    path = OUT / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def main():
    if not WASM.exists():
        print(f"{WASM} is missing: run `make build` first", file=sys.stderr)
        return 1
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    tag = version()
    wasm = WASM.read_bytes()
    layer = {**blob(wasm), "mediaType": "application/vnd.module.wasm.content.layer.v1+wasm",
             "annotations": {"org.opencontainers.image.title": "plugin.wasm"}}
    config = {**blob(json.dumps({"created": "1970-01-01T00:00:00Z", "author": "apikeyrouter",
                                 "platform": {"architecture": "wasm", "os": "wasip1"}}).encode()),
              "mediaType": "application/vnd.module.wasm.config.v1+json"}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config, "layers": [layer],
                "annotations": {"org.opencontainers.image.title": "apikeyrouter",
                                "org.opencontainers.image.version": tag}}
    mdesc = {**blob(json.dumps(manifest).encode()), "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "annotations": {"org.opencontainers.image.ref.name": tag}}
    (OUT / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    (OUT / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    tar = OUT.parent / "apikeyrouter-oci.tar"
    with tarfile.open(tar, "w") as t:
        t.add(OUT, arcname=".")
    print(f"OCI layout: {OUT} (tag {tag}, module {layer['digest']}, {len(wasm)} bytes)")
    print(f"tarball:    {tar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
