"""What a Phoenix project holds, read through Phoenix's own client, as one JSON document.

Run by ``e2e/e2e_phoenix.py`` with the Phoenix venv's Python (``.venv-phoenix``: this file imports
nothing of turnfleet's, and turnfleet's venv has no Phoenix). Usage::

    python e2e/phoenix_read.py <base_url> <project> [--count]

``--count`` prints only the project's span count (the driver polls it until the export has
landed). Otherwise: ``{"version", "spans", "sessions", "session_turns", "session_pages"}`` —
every span of the project (``client.spans.get_spans``: the REST spans API), the project's
sessions (``client.sessions.list``), per session its turns as Phoenix's session page shows them
(``client.sessions.get_session_turns``: each trace's root span's ``input.value`` /
``output.value``) and the figures of the sessions list (first input, last output, user, tokens,
cost: Phoenix's GraphQL API, which the client does not wrap).
"""

from __future__ import annotations

import json
import sys

import httpx
from phoenix.client import Client

MAX_SPANS = 100_000
SESSION_PAGE = """query ($id: ID!) { node(id: $id) { ... on ProjectSession {
  sessionId numTraces numTracesWithError userId
  firstInput { value } lastOutput { value }
  tokenUsage { prompt completion total }
  costSummary { total { cost tokens } } } } }"""


def spans(client: Client, project: str) -> list:
    try:
        return client.spans.get_spans(project_identifier=project, limit=MAX_SPANS)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:  # no span has arrived yet: no project either
            return []
        raise


def main(argv: list[str]) -> int:
    base_url, project = argv[0], argv[1]
    client = Client(base_url=base_url)
    found = spans(client, project)
    if "--count" in argv:
        print(len(found))
        return 0
    sessions = client.sessions.list(project_name=project) if found else []
    turns = {s["session_id"]: client.sessions.get_session_turns(session_id=s["session_id"])
             for s in sessions}
    pages = {}
    for session in sessions:
        answer = httpx.post(f"{base_url}/graphql", json={"query": SESSION_PAGE, "variables": {"id": session["id"]}},
                            timeout=30)
        answer.raise_for_status()
        body = answer.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL: {body['errors'][0].get('message')}")
        pages[session["session_id"]] = body["data"]["node"]
    version = httpx.get(f"{base_url}/arize_phoenix_version", timeout=10).text.strip()
    json.dump({"version": version, "spans": found, "sessions": sessions, "session_turns": turns,
               "session_pages": pages},
              sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
