"""Resolve one adapter folder through the HTTP store, served by Python's own HTTP file server.

``python docs/examples/check_http_store.py ./sql-expert`` copies the folder into a temporary site,
writes its ``index.json``, and prints the snapshot vLLM would load, then ``None`` for a name the
server does not have. Python's file server ignores ``Range``: the store reads each file whole.
"""

import json
import shutil
import sys
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vllm_lora_resolvers.backends.http import HttpStore, write_indexes
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

adapter = Path(sys.argv[1]).resolve()  # a PEFT adapter folder; its name is the adapter's name
config = json.loads((adapter / "adapter_config.json").read_text())
site = Path(tempfile.mkdtemp(prefix="vllm-lora-site-"))
shutil.copytree(adapter, site / adapter.name)
write_indexes(site)  # as a publisher does before uploading
handler = partial(SimpleHTTPRequestHandler, directory=str(site))
server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
threading.Thread(target=server.serve_forever, daemon=True).start()

cache_dir = Path(tempfile.mkdtemp(prefix="vllm-lora-cache-"))
settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}, argv=[])
url = f"http://127.0.0.1:{server.server_port}"
resolver = Resolver(HttpStore(url, settings, NodeCache(cache_dir)))
resolved = resolver.resolve(config["base_model_name_or_path"], adapter.name)
print(resolved.path if resolved else "not found")
print(resolver.resolve(config["base_model_name_or_path"], "no-such-adapter"))
server.shutdown()
