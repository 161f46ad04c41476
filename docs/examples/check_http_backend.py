"""Resolve one adapter folder through `HttpStore`, served by Python's own HTTP file server.

Run it beside ``http_backend.py``: ``python check_http_backend.py ./sql-expert``. It prints the
snapshot vLLM would load, then ``None`` for a name the server does not have.
"""

import json
import sys
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from http_backend import HttpStore

from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.transfer import TransferConfig

adapter = Path(sys.argv[1]).resolve()  # a PEFT adapter folder; its name is the adapter's name
config = json.loads((adapter / "adapter_config.json").read_text())
handler = partial(SimpleHTTPRequestHandler, directory=str(adapter.parent))
server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
threading.Thread(target=server.serve_forever, daemon=True).start()

cache_dir = Path(tempfile.mkdtemp(prefix="vllm-lora-cache-"))
settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}, argv=[])
url = f"http://127.0.0.1:{server.server_port}"
# Python's file server ignores Range: fetch each file in one part.
resolver = Resolver(
    HttpStore(url, settings, NodeCache(cache_dir), TransferConfig(part_size=1 << 40))
)
resolved = resolver.resolve(config["base_model_name_or_path"], adapter.name)
print(resolved.path if resolved else "not found")
print(resolver.resolve(config["base_model_name_or_path"], "no-such-adapter"))
server.shutdown()
