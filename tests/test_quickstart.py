"""The README's quick start, tried as a new user would: `make run`, then the
official OpenAI Python SDK against the demo gateway."""

import os
import queue
import re
import signal
import subprocess
import threading
import time

import pytest

from harness import DEMO_CLIENT_KEY, ROOT

# `make run` may first build the module and set up the venv (minutes on a
# fresh machine); it has MAKE_RUN_S to print the gateway's address.
MAKE_RUN_S = 300


@pytest.mark.timeout(MAKE_RUN_S + 120)
def test_readme_quick_start_serves_the_openai_sdk():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick and "make test" in quick
    assert DEMO_CLIENT_KEY in quick, "the quick start shows the demo client key"

    proc = subprocess.Popen(["make", "run"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    # A thread reads make's output, so that the wait below has a deadline
    # even when make prints nothing; "" marks its end.
    lines = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out = []
    url = None
    try:
        deadline = time.monotonic() + MAKE_RUN_S
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if not line:
                break
            out.append(line)
            m = re.search(r"gateway \(OpenAI-compatible\)\s+(http://127\.0\.0\.1:\d+)/v1/", line)
            if m:
                url = m.group(1)
            if "Press Ctrl-C to stop." in line:
                break
        assert url, f"make run did not print the gateway address within {MAKE_RUN_S} s:\n" + "".join(out[-40:])
        printed = "".join(out)
        assert "from openai import OpenAI" in printed and "curl" in printed

        from openai import OpenAI
        client = OpenAI(base_url=url + "/v1", api_key=DEMO_CLIENT_KEY, max_retries=0)

        r = client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "Hello"}])
        assert r.choices[0].message.content
        assert r.usage.total_tokens > 0

        chunks = list(client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream please"}], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0, \
            "the gateway asked for usage on the stream"

        e = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
        assert len(e.data) == 2 and len(e.data[0].embedding) > 0

        # A wrong key is refused the way the SDK expects.
        import openai
        bad = OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
        try:
            bad.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
            raise AssertionError("a wrong key was served")
        except openai.AuthenticationError as err:
            assert err.status_code == 401
    finally:
        # Ctrl-C stops everything make run started.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    reader.join(timeout=30)
    assert not reader.is_alive(), "make run's output did not end after it stopped"
    rest = "".join(iter(lines.get_nowait, ""))
    assert "stopped Envoy and the mock provider" in rest, "".join(out[-10:]) + rest
