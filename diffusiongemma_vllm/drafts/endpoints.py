"""Live drafts over HTTP and the playground page: a vLLM endpoint plugin.

`DraftEndpoints` is the `vllm.endpoint_plugins` entry point `diffusiongemma`. It replaces
`POST /v1/completions` and `POST /v1/chat/completions` with routes that call vLLM's own route
functions and, for a streamed request whose `vllm_xargs` has `draft_every`, weave the
worker's drafts into vLLM's stream (drafts/stream.py); every other request goes to vLLM's route
untouched. It also serves `GET /playground` (playground.html), which shows a prompt's
canvases denoising pass by pass from that stream.

How a draft travels: the streamed request gets a fresh `draft_key` in its `vllm_xargs`
(extra_args); the worker publishes the canvas's argmax under that key on a ZeroMQ PUB socket
(drafts/publisher.py) every `draft_every` passes; this process's SUB socket (`DraftSubscriber`) hands
it to the request's stream. No vLLM structure carries it: nothing on the worker -> engine
core -> API server path holds per-request data in the middle of a step.

Why an endpoint plugin, opted into with `VLLM_PLUGINS=diffusiongemma`, rather than patching
vLLM's serving classes from `register()` (which runs in the API server too, with no opt-in):
the plugin interface is vLLM's supported way to replace a route (same path and method replace
the stock one, `attach_endpoint_plugins`), it wraps vLLM's route functions instead of
reaching into OpenAIServingCompletion/OpenAIServingChat internals that change between
releases, and vLLM keeps endpoint plugins opt-in because they change the HTTP surface. The
price is the opt-in: `VLLM_PLUGINS` is also the allowlist of general plugins, so it must name
`diffusiongemma` (all three of the plugin's entry points share that name) or vLLM silently
serves its in-tree DiffusionGemma; any other plugin the server needs must be listed as well.
Without the opt-in, `draft_every` is refused by request_validator.py rather than ignored.
"""

from __future__ import annotations

import logging
import os
import uuid
from importlib.resources import files

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from vllm.entrypoints.openai.chat_completion import api_router as vllm_chat
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion import api_router as vllm_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.utils.api_utils import should_include_usage, validate_json_request

from diffusiongemma_vllm import ARCHITECTURE, DRAFTS_ENV
from diffusiongemma_vllm.drafts.stream import DraftFormat, DraftSubscriber, with_drafts
from diffusiongemma_vllm.drafts.publisher import check_draft_args

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures
router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(validate_json_request)])
async def create_completion(request: CompletionRequest, raw_request: Request):
    return await _serve(vllm_completion.create_completion, request, raw_request, chat=False)


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)])
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
    return await _serve(vllm_chat.create_chat_completion, request, raw_request, chat=True)


@router.get("/playground", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    return HTMLResponse(files(__package__).joinpath("playground.html").read_text())


async def _serve(vllm_route, request, raw_request: Request, chat: bool):
    subscriber: DraftSubscriber | None = getattr(raw_request.app.state, "diffusion_drafts", None)
    xargs = request.vllm_xargs or {}
    if "draft_key" in xargs:  # the server's to set: a client's would publish drafts nobody reads
        return JSONResponse(status_code=400, content={"error": {
            "message": "draft_key is set by the server; ask for drafts with draft_every on a streamed request",
            "type": "BadRequestError", "param": "draft_key", "code": 400}})
    if "draft_every" not in xargs or not request.stream or subscriber is None:
        return await vllm_route(request, raw_request)  # the request_validator refuses a stray draft_every
    key = uuid.uuid4().hex
    try:
        check_draft_args({**xargs, "draft_key": key})
        _check_one_choice(request, chat)
    except ValueError as error:
        return JSONResponse(status_code=400, content={"error": {
            "message": str(error), "type": "BadRequestError", "param": "draft_every", "code": 400}})
    request.vllm_xargs = {**xargs, "draft_key": key}
    response = await vllm_route(request, raw_request)
    if not isinstance(response, StreamingResponse):
        return response  # an error, as vLLM answers it
    state = raw_request.app.state
    stop = request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    tokenizer = state.diffusion_tokenizer

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=request.skip_special_tokens)

    serving = state.openai_serving_chat if chat else state.openai_serving_completion
    _, continuous_usage = should_include_usage(request.stream_options, serving.enable_force_include_usage)
    form = DraftFormat(chat=chat, id=("chatcmpl-" if chat else "cmpl-") + _base_id(request, raw_request),
                       model=state.openai_serving_models.model_name(), decode=decode, stop=tuple(stop),
                       include_stop_str=request.include_stop_str_in_output, min_tokens=request.min_tokens or 0,
                       token_ids=bool(request.return_token_ids), usage=continuous_usage)
    response.body_iterator = with_drafts(response.body_iterator, subscriber, key.encode(), form)
    return response


def _check_one_choice(request, chat: bool) -> None:
    """Drafts carry no choice index: one prompt, one choice, no beam search."""
    prompt = None if chat else request.prompt
    several_prompts = isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list))
    if (request.n or 1) > 1 or request.use_beam_search or several_prompts:
        raise ValueError("draft_every streams one choice: use n=1, one prompt and no beam search")


def _base_id(request, raw_request: Request) -> str:
    """The id vLLM gives the stream's chunks (OpenAIServing._base_request_id)."""
    return raw_request.headers.get("X-Request-Id") or request.request_id


class DraftEndpoints:
    """The `vllm.endpoint_plugins` entry point (vllm/plugins/endpoint_plugins/interface.py)."""

    name = "diffusiongemma"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        """Connect the draft subscriber when this server runs the plugin's DiffusionGemma; else
        the routes pass every request to vLLM's."""
        address = os.environ.get(DRAFTS_ENV)
        architectures = getattr(getattr(engine_client, "model_config", None), "architectures", None) or ()
        if engine_client is None or ARCHITECTURE not in architectures or not address:
            logger.info("DiffusionGemma live drafts off (served: %s, %s=%s)", list(architectures), DRAFTS_ENV, address)
            return
        state.diffusion_tokenizer = engine_client.get_tokenizer()
        state.diffusion_drafts = DraftSubscriber(address)
        logger.info("DiffusionGemma live drafts on: /v1/completions and /v1/chat/completions with "
                    "vllm_xargs draft_every; playground at /playground (drafts from %s)", address)
