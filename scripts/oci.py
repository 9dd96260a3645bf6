#!/usr/bin/env python3
"""`make oci`: packages apikeyrouter.wasm as an OCI image Istio can pull, without Docker.

Istio's agent (istio/istio pkg/wasm/imagefetcher.go, PrepareFetch) accepts three
shapes: a Docker image, the "compat" OCI variant, and the two-layer solo.io
variant. This writes the compat variant (spec-compat.md of solo-io/wasm): an OCI
image manifest whose last (here: only) layer is
`application/vnd.oci.image.layer.v1.tar+gzip` holding `plugin.wasm`
(extractOCIStandardImage / extractWasmPluginBinary), with an ordinary OCI image
config. Being an ordinary image, it is also what a Kubernetes image volume mounts.

Output, byte for byte the same for the same module (fixed timestamps, owners and
gzip header):
  dist/oci/                 an OCI image layout, tag = Cargo.toml's version
  dist/apikeyrouter-oci.tar the same layout as one tarball
  dist/oci.json             the module's sha256, the manifest digest and the tag

Push it by digest with skopeo (Debian's `skopeo`) or any OCI client:

    skopeo copy oci:dist/oci:0.1.0 docker://registry.example.com/apikeyrouter:0.1.0

and use `oci://registry.example.com/apikeyrouter@sha256:<manifest digest>`: the
agent checks a pulled image against that digest (pkg/wasm/cache.go, getOrFetch).
"""

import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "apikeyrouter.wasm"
DIST = ROOT / "dist"

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
PLUGIN_NAME = "plugin.wasm"  # the file name Istio's agent looks for in the layer


def version():
    for line in (ROOT / "Cargo.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split('"')[1]
    return "0.0.0"


def layer_tar(wasm):
    """The uncompressed layer: one regular file, plugin.wasm, 0644, root-owned, mtime 0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(PLUGIN_NAME)
        info.size, info.mode, info.mtime = len(wasm), 0o644, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        t.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_fixed(data):
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as g:
        g.write(data)
    return out.getvalue()


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(wasm, tag, out):
    """Writes the OCI layout for `wasm` to `out`; returns its description."""
    def blob(data):
        digest = sha(data)
        path = out / "blobs" / "sha256" / digest.split(":", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"digest": digest, "size": len(data)}

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tar = layer_tar(wasm)
    layer = {"mediaType": LAYER_TYPE, **blob(gzip_fixed(tar)),
             "annotations": {"org.opencontainers.image.title": PLUGIN_NAME}}
    config_doc = {
        "created": "1970-01-01T00:00:00Z",
        "author": "apikeyrouter",
        # Not a runnable container: the platform says what the module is built for.
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha(tar)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "make oci (scripts/oci.py)"}],
    }
    config = {"mediaType": CONFIG_TYPE, **blob(json.dumps(config_doc, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config, "layers": [layer],
                "annotations": {"org.opencontainers.image.title": "apikeyrouter",
                                "org.opencontainers.image.version": tag}}
    mbytes = json.dumps(manifest, sort_keys=True).encode()
    mdesc = {"mediaType": MANIFEST_TYPE, **blob(mbytes),
             "annotations": {"org.opencontainers.image.ref.name": tag}}
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}, sort_keys=True))
    (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return {"tag": tag, "module_sha256": hashlib.sha256(wasm).hexdigest(), "module_bytes": len(wasm),
            "manifest_digest": mdesc["digest"], "layer_digest": layer["digest"]}


def tarball(src, dest):
    with tarfile.open(dest, "w") as t:
        for path in sorted(src.rglob("*")):
            info = t.gettarinfo(str(path), arcname=str(path.relative_to(src)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_file():
                with open(path, "rb") as f:
                    t.addfile(info, f)
            else:
                t.addfile(info)


def main(argv):
    wasm_path = Path(argv[1]) if len(argv) > 1 else WASM
    dist = Path(argv[2]) if len(argv) > 2 else DIST
    if not wasm_path.exists():
        print(f"{wasm_path} is missing: run `make build` first", file=sys.stderr)
        return 1
    desc = build(wasm_path.read_bytes(), version(), dist / "oci")
    tarball(dist / "oci", dist / "apikeyrouter-oci.tar")
    (dist / "oci.json").write_text(json.dumps(desc, indent=1) + "\n")
    print(f"OCI layout: {dist / 'oci'} (tag {desc['tag']}, compat variant: {PLUGIN_NAME} in one tar+gzip layer)")
    print(f"module:     sha256:{desc['module_sha256']} ({desc['module_bytes']} bytes)")
    print(f"manifest:   {desc['manifest_digest']}  (use oci://REGISTRY/apikeyrouter@{desc['manifest_digest']})")
    print(f"tarball:    {dist / 'apikeyrouter-oci.tar'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
