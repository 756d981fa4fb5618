"""A stand-in for a container registry (the OCI distribution API, pull side only, plain HTTP on
loopback) serving an OCI image layout such as `skopeo copy docker-daemon:NAME:TAG oci:DIR:TAG`
writes. CI has no registry and no network: this is what `docker://` task images are pulled from
in the tests, by the real skopeo, which reaches it as an insecure registry named in a
`registries.conf` (CONTAINERS_REGISTRIES_CONF), as a user's plain-HTTP cluster registry would be."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

_TAG = "org.opencontainers.image.ref.name"


class Registry:
    def __init__(self, layout: Path) -> None:
        self.layout = layout
        self.pulls: list[str] = []  # the manifests asked for, as "name:reference"

    def _blob(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        path = self.layout / "blobs" / algorithm / hexdigest
        if algorithm != "sha256" or not hexdigest.isalnum() or not path.is_file():
            raise web.HTTPNotFound(text=json.dumps({"errors": [{"code": "BLOB_UNKNOWN"}]}))
        return path

    async def manifest(self, request: web.Request) -> web.Response:
        name, reference = request.match_info["name"], request.match_info["reference"]
        self.pulls.append(f"{name}:{reference}")
        index = json.loads((self.layout / "index.json").read_text())
        found = [
            m for m in index["manifests"]
            if m["digest"] == reference or m.get("annotations", {}).get(_TAG) in (reference, f"{name}:{reference}")
        ]  # fmt: skip
        if not found:
            raise web.HTTPNotFound(text=json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN"}]}))
        body = self._blob(found[0]["digest"]).read_bytes()
        headers = {"Content-Type": found[0]["mediaType"], "Docker-Content-Digest": found[0]["digest"]}
        return web.Response(body=b"" if request.method == "HEAD" else body, headers=headers)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        path = self._blob(request.match_info["digest"])
        return web.FileResponse(path, headers={"Docker-Content-Digest": request.match_info["digest"]})


async def _version_check(_request: web.Request) -> web.Response:
    return web.json_response({})


@asynccontextmanager
async def serving(layout: Path, conf: Path) -> AsyncIterator[tuple[Registry, str]]:
    """The registry on a loopback port, and `conf` written as the registries.conf that names it
    insecure; yields it and its host:port."""
    registry = Registry(layout)
    app = web.Application()
    app.router.add_get("/v2/", _version_check)
    app.router.add_route("*", "/v2/{name:.+}/manifests/{reference}", registry.manifest)
    app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", registry.blob)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    conf.write_text(f'[[registry]]\nlocation = "127.0.0.1:{port}"\ninsecure = true\n')
    try:
        yield registry, f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()
