"""`make oci` (scripts/oci.py) writes an image Istio's agent can pull: the
"compat" variant, whose last layer is application/vnd.oci.image.layer.v1.tar+gzip
holding plugin.wasm (istio/istio pkg/wasm/imagefetcher.go, extractOCIStandardImage
and extractWasmPluginBinary).

The round trip runs against a real registry: Debian's docker-registry (the
CNCF distribution registry) started here on a loopback port, skopeo pushing the
layout into it and pulling it back. The plugin.wasm that comes back is the
build's, byte for byte, and the registry serves the manifest under the digest
that scripts/oci.py printed, which is what an `oci://...@sha256:` URL pins."""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import pytest

from harness import ROOT, WASM, free_port, wait_until

sys.path.insert(0, str(ROOT / "scripts"))
import oci  # noqa: E402

REGISTRY_BIN = os.environ.get("DOCKER_REGISTRY_BIN") or "/usr/bin/docker-registry"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def need(binary):
    path = shutil.which(binary) or (binary if os.path.exists(binary) else None)
    assert path, f"{binary} is missing: `make setup` installs Debian's skopeo and docker-registry"
    return path


def stop_process(proc, timeout=10):
    """SIGTERM, then SIGKILL after `timeout` seconds; waits for it either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Registry:
    """Debian's docker-registry serving from a temp dir on 127.0.0.1:<free port>."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="akr-registry-")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = Path(self.dir) / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.dir}/data}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '{self.host}'}}\n")
        self.log = open(Path(self.dir) / "registry.log", "w")
        self.proc = subprocess.Popen([need(REGISTRY_BIN), "serve", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry exited: " + Path(self.log.name).read_text()[-2000:])
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as r:
                return r.status == 200
        wait_until(up, timeout=20, what="docker-registry", errors=(OSError,))

    def get(self, path, accept=None):
        req = urllib.request.Request(f"http://{self.host}/v2/{path}", headers={"accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()

    def stop(self):
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def registry():
    r = Registry()
    yield r
    r.stop()


@pytest.fixture
def image(tmp_path):
    """`make oci`'s output for the build, written to a temp dist/."""
    assert oci.main(["oci.py", str(WASM), str(tmp_path / "dist")]) == 0
    return tmp_path / "dist", json.loads((tmp_path / "dist" / "oci.json").read_text())


def skopeo(*args):
    p = subprocess.run([need("skopeo"), *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"skopeo {' '.join(args)}:\n{p.stdout}{p.stderr}"
    return p.stdout


def plugin_wasm_like_istio(manifest, blob):
    """What istio-agent does with an OCI manifest (pkg/wasm/imagefetcher.go):
    not a Docker manifest, so try the compat variant: the last layer must be
    application/vnd.oci.image.layer.v1.tar+gzip, and plugin.wasm is the tar
    entry whose base name is plugin.wasm. `blob(digest)` returns a blob's bytes."""
    assert manifest.get("mediaType") != DOCKER_MANIFEST
    layers = manifest["layers"]
    assert layers, "number of layers must be greater than zero"
    last = layers[-1]
    assert last["mediaType"] == OCI_LAYER, last["mediaType"]
    data = blob(last["digest"])
    assert "sha256:" + hashlib.sha256(data).hexdigest() == last["digest"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as t:
        for member in t:
            if os.path.basename(member.name) == "plugin.wasm":
                return t.extractfile(member).read()
    raise AssertionError("plugin.wasm not found in the archive")


def layout_blob(layout, digest):
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def test_make_oci_writes_the_compat_variant_holding_the_build(image):
    dist, desc = image
    layout = dist / "oci"
    index = json.loads((layout / "index.json").read_text())
    [mdesc] = index["manifests"]
    assert mdesc["digest"] == desc["manifest_digest"]
    assert mdesc["annotations"]["org.opencontainers.image.ref.name"] == desc["tag"] == oci.version()
    manifest = json.loads(layout_blob(layout, mdesc["digest"]))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert [l["mediaType"] for l in manifest["layers"]] == [OCI_LAYER]
    module = plugin_wasm_like_istio(manifest, lambda d: layout_blob(layout, d))
    assert module == WASM.read_bytes()
    assert hashlib.sha256(module).hexdigest() == desc["module_sha256"]
    # The config's diff_id is the uncompressed layer's digest (an ordinary image).
    config = json.loads(layout_blob(layout, manifest["config"]["digest"]))
    raw = gzip.decompress(layout_blob(layout, manifest["layers"][0]["digest"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    with tarfile.open(dist / "apikeyrouter-oci.tar") as t:
        assert "index.json" in t.getnames() and "oci-layout" in t.getnames()


def test_make_oci_is_reproducible(image, tmp_path):
    dist, desc = image
    assert oci.main(["oci.py", str(WASM), str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "oci.json").read_text())
    assert again == desc, "same module, same manifest digest: the digest in a manifest stays valid"
    assert (tmp_path / "again" / "apikeyrouter-oci.tar").read_bytes() == (dist / "apikeyrouter-oci.tar").read_bytes()


def test_image_round_trips_through_a_real_registry_with_skopeo(image, registry, tmp_path):
    dist, desc = image
    ref = f"{registry.host}/apikeyrouter:{desc['tag']}"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{dist / 'oci'}:{desc['tag']}", f"docker://{ref}")

    # What istio-agent does with oci://<registry>/apikeyrouter@sha256:<digest>:
    # GET the manifest by digest, check the digest, take plugin.wasm out of the
    # last layer.
    digest = desc["manifest_digest"]
    status, headers, body = registry.get(f"apikeyrouter/manifests/{digest}",
                                         accept="application/vnd.oci.image.manifest.v1+json")
    assert status == 200 and headers["docker-content-digest"] == digest
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    module = plugin_wasm_like_istio(json.loads(body), lambda d: registry.get(f"apikeyrouter/blobs/{d}")[2])
    assert hashlib.sha256(module).hexdigest() == hashlib.sha256(WASM.read_bytes()).hexdigest()

    # The tag resolves to the same digest, and skopeo pulls the image back by digest.
    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))
    assert inspected["Digest"] == digest
    back = tmp_path / "pulled"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/apikeyrouter@{digest}", f"oci:{back}:pulled")
    [pulled] = json.loads((back / "index.json").read_text())["manifests"]
    assert pulled["digest"] == digest
    manifest = json.loads(layout_blob(back, digest))
    module = plugin_wasm_like_istio(manifest, lambda d: layout_blob(back, d))
    assert hashlib.sha256(module).hexdigest() == desc["module_sha256"] == hashlib.sha256(WASM.read_bytes()).hexdigest()


def test_a_pull_by_a_wrong_digest_is_refused(image, registry):
    dist, desc = image
    skopeo("copy", "--dest-tls-verify=false", f"oci:{dist / 'oci'}:{desc['tag']}",
           f"docker://{registry.host}/apikeyrouter:{desc['tag']}")
    wrong = "sha256:" + "0" * 64
    p = subprocess.run([need("skopeo"), "inspect", "--tls-verify=false", "--raw",
                        f"docker://{registry.host}/apikeyrouter@{wrong}"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p.stdout
