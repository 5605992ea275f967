"""An OpenAI-compatible HTTP gateway over the swarm: `swarm serve MODEL --initial-peers ...`.

  * app.py           the FastAPI app: routes, API-key check, request counting, the chat page at `/`
  * schemas.py       pydantic models of the OpenAI requests and responses the gateway speaks
  * errors.py        OpenAI error objects, and the one place where errors become HTTP statuses
  * generation.py    from a request to the distributed model: one session per request, streamed text,
                     stop sequences, finish_reason, usage
  * chat_template.py the tokenizer's chat template, or the documented plain one
  * metrics.py       Prometheus metrics `blockswarm_gateway_*`
  * server.py        uvicorn on the client's event loop; the line that says where the gateway listens
  * static/          the chat page (plain HTML and JavaScript)

FastAPI and uvicorn are imported only here, so the rest of `swarm` does not need them.
"""

from swarm.gateway.app import build_app
from swarm.gateway.generation import TextGenerator
from swarm.gateway.metrics import GatewayMetrics
from swarm.gateway.server import serve

__all__ = ["GatewayMetrics", "TextGenerator", "build_app", "serve"]
