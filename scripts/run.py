#!/usr/bin/env python3
"""`make run`: the filter in real Envoy against the built-in mock provider.

Starts, on 127.0.0.1, the mock OpenAI provider (three demo keys, the third
always rate-limited) and Envoy with envoy/demo.yaml, prints how to call the
gateway, and stops both on Ctrl-C.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import ADMIN_TOKEN, DEMO_CLIENT_KEY, Envoy, Mock, free_port  # noqa: E402


def main():
    mock = Mock(rate_limited=["sk-demo-3"], port=free_port(int(os.environ.get("MOCK_PORT", 18080))))
    try:
        envoy = Envoy(mock.port, gateway_port=free_port(int(os.environ.get("GATEWAY_PORT", 10000))),
                      admin_port=free_port(int(os.environ.get("ADMIN_PORT", 9901))))
    except Exception:
        mock.stop()
        raise
    url = envoy.url
    print(f"""
apikeyrouter is running.

  gateway (OpenAI-compatible)  {url}/v1/   (client key: {DEMO_CLIENT_KEY})
  management API               {url}/apikeyrouter/v1/   (token: {ADMIN_TOKEN})
  Envoy admin                  {envoy.admin_url}/   (stats: {envoy.admin_url}/stats?filter=wasm)
  mock provider                {mock.url}   (keys demo-1, demo-2; demo-3 always answers 429)
  Envoy log                    {envoy.log_path}

Call it with curl:

  curl -s {url}/v1/chat/completions -H 'authorization: Bearer {DEMO_CLIENT_KEY}' \\
    -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Hello"}}]}}' -i

  curl -sN {url}/v1/chat/completions -H 'authorization: Bearer {DEMO_CLIENT_KEY}' \\
    -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"Hello"}}]}}'

  curl -s {url}/apikeyrouter/v1/keys -H 'authorization: Bearer {ADMIN_TOKEN}'

Or with the official OpenAI Python SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{DEMO_CLIENT_KEY}")
  r = client.chat.completions.create(model="gpt-4o-mini",
                                     messages=[{{"role": "user", "content": "Hello"}}])
  print(r.choices[0].message.content)

Press Ctrl-C to stop.
""", flush=True)

    stopping = []

    def stop(*_):
        stopping.append(True)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            if envoy.proc.poll() is not None:
                print("envoy exited:\n" + envoy.logs()[-3000:], file=sys.stderr)
                return 1
            if mock.proc.poll() is not None:
                print("the mock provider exited", file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        envoy.stop()
        mock.stop()
        print("stopped Envoy and the mock provider")
    return 0


if __name__ == "__main__":
    sys.exit(main())
