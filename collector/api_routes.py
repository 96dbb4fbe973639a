"""The JSON API's routes: a FastAPI router over a :class:`collector.api.CollectorView`.

What each route answers is described in :mod:`collector.api` (which stays free of FastAPI, so
the collector's other modules can import its types and the token helpers cheaply). Routes are
plain functions: FastAPI runs them on its thread pool, since the store reads and the wait for a
PUBACK block. A failure is raised as :class:`collector.api.ApiError` and written by the app's
handler (:mod:`collector.app`).
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from collector.api import MAX_JSON_DEPTH, MAX_SERIES, ApiError, CollectorView
from collector.errors import BrokerError
from device_agent.contracts import messages as msg
from device_agent.errors import ProtocolError
from device_agent.httpjson import RequestError, dumps_json, parse_json

__all__ = ["CommandRequest", "api_router", "json_response"]

log = logging.getLogger("collector.api")


class CommandRequest(BaseModel):
    """The body of ``POST /api/devices/{device}/commands`` (for the OpenAPI document; the
    route checks the parsed body itself, so that its errors name the field as before)."""

    model_config = ConfigDict(extra="forbid")

    action: str = Field(description="what the device should do, e.g. ping, benchmark, deploy")
    args: dict[str, Any] = Field(default_factory=dict, description="the action's arguments")
    id: str | None = Field(None, description="the command's id (default: a new random one)")
    expires_in_s: float | None = Field(
        300, gt=0, le=30 * 86400, description="seconds until the device ignores it; null: never"
    )
    fleet: str | None = Field(None, description="the device's fleet, when the store has several")


# --- answers ------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    """Strict JSON (non-finite floats as null), as every API answer is written."""
    return Response(
        dumps_json(body, default=_jsonable),
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


# --- routes -------------------------------------------------------------------------------------


async def _body(request: Request) -> bytes:
    """The request's body (its size was checked against MAX_BODY_BYTES before any was read)."""
    try:
        return await request.body()
    except ClientDisconnect:  # closed for a timeout or by the client: nobody reads an answer
        raise ApiError(400, "the connection closed before the body arrived") from None


def api_router(collector: CollectorView) -> APIRouter:
    """The ``/api/...`` routes above, reading and commanding ``collector``. Routes are plain
    functions: FastAPI runs them on its thread pool, since the store reads and the wait for a
    PUBACK block."""
    router = APIRouter(tags=["api"])

    @router.get("/api/health", summary="The collector's connection, counters and store")
    def health() -> Response:
        body = collector.health()
        return json_response(200 if body["ok"] else 503, body)

    @router.get("/api/devices", summary="The fleet: every device's state, and fleet totals")
    def devices() -> Response:
        return json_response(200, collector.state.snapshot().to_dict())

    @router.get("/api/dead-letters", summary="The newest rejected messages, and counts")
    def dead_letters(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Response:
        store = collector.state.store
        rows = store.dead_letters(limit)
        newest = [
            {"id": r.id, "received_at": r.received_at, "topic": r.topic, "size": r.size,
             "field": r.field, "error": r.error,
             "payload_preview": r.payload[:256].decode("utf-8", "replace")}
            for r in rows
        ]  # fmt: skip
        return json_response(200, {"counts": store.dead_letter_counts(), "newest": newest})

    @router.get("/api/rollouts", summary="Staged rollouts, newest first")
    def rollouts(
        fleet: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20
    ) -> Response:
        shown = _rollout_fleet(collector, fleet)
        rows = collector.state.store.rollouts(shown, limit=limit)
        return json_response(200, {"fleet": shown, "rollouts": [r.to_dict() for r in rows]})

    @router.get(
        "/api/rollouts/{fleet}/{rollout_id}",
        summary="One staged rollout: its waves, every device's state, devices per state",
    )
    def rollout(fleet: str, rollout_id: str) -> Response:
        _rollout_fleet(collector, fleet)  # 400 unless a valid id of the collector's fleet
        try:
            msg.validate_id(rollout_id, "rollout")
        except ProtocolError as exc:
            raise _bad(str(exc)) from None
        row = collector.state.store.rollout(fleet, rollout_id)
        if row is None:
            raise ApiError(404, f"no rollout {rollout_id!r} of fleet {fleet!r} in the store")
        return json_response(200, row.to_dict())

    @router.get(
        "/api/devices/{device}/commands/{command_id}",
        summary="A command sent through this API, and the device's reply",
    )
    def get_command(device: str, command_id: str, fleet: str | None = None) -> Response:
        return json_response(200, _command_status(collector, device, command_id, fleet))

    @router.post(
        "/api/devices/{device}/commands",
        status_code=202,
        summary="Send a command to a device (needs the API token)",
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": CommandRequest.model_json_schema()}},
            }
        },
    )
    def post_command(
        device: str, body: Annotated[bytes, Depends(_body)], fleet: str | None = None
    ) -> Response:
        answer, location = _send_command(collector, device, body, fleet)
        return json_response(202, answer, {"Location": location})

    @router.get("/api/devices/{device:path}", summary="One device: state, series and events")
    def device(
        device: str,
        series: Annotated[int, Query(ge=0, le=MAX_SERIES)] = 120,
        events: Annotated[int, Query(ge=0, le=1000)] = 20,
        fleet: str | None = None,
    ) -> Response:
        try:
            detail = collector.state.device(device, fleet=fleet, series=series, events=events)
        except LookupError as exc:
            raise _bad(str(exc)) from None
        if detail is None:
            raise ApiError(404, f"no device {device!r} in the store")
        return json_response(200, detail.to_dict())

    return router


def _rollout_fleet(collector: CollectorView, fleet: str | None) -> str | None:
    """The fleet whose rollouts to show: the one named (a valid id of the collector's fleet,
    else 400), or the collector's (None: every fleet)."""
    own = collector.state.fleet
    if fleet is None:
        return own
    try:
        msg.validate_id(fleet, "fleet")
    except ProtocolError as exc:
        raise _bad(str(exc)) from None
    if own is not None and fleet != own:
        raise _bad(f"this collector collects fleet {own!r}, not {fleet!r}")
    return fleet


def _fleet_of(collector: CollectorView, device: str, fleet: str | None) -> str | None:
    """The fleet to address ``device`` in: the one named, the collector's, or the only one
    the store knows the device in (None: the device is unknown, nothing sent)."""
    state = collector.state
    own = state.fleet
    if fleet is not None:
        try:
            msg.validate_id(fleet, "fleet")
        except ProtocolError as exc:
            raise _bad(str(exc)) from None
        if own is not None and fleet != own:
            raise _bad(f"this collector collects fleet {own!r}, not {fleet!r}")
        return fleet
    if own is not None:
        return own
    fleets = sorted({r.fleet for r in state.store.devices(None) if r.device == device})
    if len(fleets) > 1:
        raise _bad(f"device {device!r} exists in fleets {fleets}; name one (fleet)")
    return fleets[0] if fleets else None


def _command_request(device: str, body: bytes) -> dict[str, Any]:
    """The body of a command, parsed strictly and checked for unknown fields."""
    try:
        msg.validate_id(device, "device")
        request = parse_json(body or b"{}", max_depth=MAX_JSON_DEPTH)
    except (ProtocolError, RequestError) as exc:
        raise _bad(str(exc)) from None
    if not isinstance(request, dict):
        raise _bad('the body must be a JSON object, e.g. {"action": "ping"}')
    unknown = sorted(set(request) - set(CommandRequest.model_fields))
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; expected action, args, id, expires_in_s, fleet")
    return request


def _send_command(
    collector: CollectorView, device: str, body: bytes, fleet_arg: str | None
) -> tuple[dict[str, Any], str]:
    """Publish the command in ``body``; (the 202 answer, its reply URL)."""
    request = _command_request(device, body)
    fleet = _fleet_of(collector, device, request.get("fleet") or fleet_arg)
    if fleet is None:
        raise ApiError(
            404,
            f'no device {device!r} in the store; name its fleet ("fleet": ...) to command a '
            "device the collector has not heard from",
        )
    now = time.time()
    expires_in = request.get("expires_in_s", 300)
    if expires_in is not None and (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not 0 < expires_in <= 30 * 86400
    ):
        raise _bad("expires_in_s must be a number of seconds in (0, 2592000] or null")
    try:
        command = msg.Command.from_dict(
            {
                "id": request.get("id") or uuid.uuid4().hex[:16],
                "action": request.get("action"),
                "ts": now,
                "args": request.get("args", {}),
                "expires": None if expires_in is None else now + expires_in,
            }
        )
    except ProtocolError as exc:
        raise _bad(f"not a valid command: {exc}") from None
    if collector.sent_command(command.id) is not None:
        raise _bad(f"command id {command.id!r} was used already; leave id out")
    try:
        sent = collector.send_command(fleet, device, command)
    except BrokerError as exc:
        raise ApiError(502, str(exc)) from None
    log.info("API: sent %s %r to %s/%s", command.id, command.action, fleet, device)
    reply_url = f"/api/devices/{urllib.parse.quote(device)}/commands/{command.id}?fleet={fleet}"
    answer = {"id": command.id, "fleet": fleet, "device": device, **sent.to_dict(),
              "state": "pending", "reply_url": reply_url}  # fmt: skip
    return answer, reply_url


def _command_status(
    collector: CollectorView, device: str, command_id: str, fleet_arg: str | None
) -> dict[str, Any]:
    """``GET /api/devices/{device}/commands/{id}``: what was sent and the device's reply."""
    sent = collector.sent_command(command_id)
    if sent is not None and sent.device != device:
        sent = None
    fleet = fleet_arg or (sent.fleet if sent else None)
    try:
        fleet = _fleet_of(collector, device, fleet)
    except ApiError:
        if sent is None:
            raise
    reply = None
    if fleet is not None:
        for event in collector.state.store.events(fleet, device, "cmd/reply", limit=1000):
            if event.body.get("id") == command_id:
                reply = event
                break
    if sent is None and reply is None:
        raise ApiError(
            404,
            f"no command {command_id!r} sent to {device!r} by this collector, and no reply to "
            "it in the store",
        )
    if reply is not None:
        state = "replied"
    elif (
        sent is not None and sent.command.expires is not None and time.time() > sent.command.expires
    ):
        state = "expired"
    else:
        state = "pending"
    return {
        "id": command_id,
        "fleet": fleet,
        "device": device,
        "state": state,
        "sent": sent.to_dict() if sent else None,
        "reply": None
        if reply is None
        else {
            "ok": reply.body.get("ok"),
            "result": reply.body.get("result"),
            "error": reply.body.get("error"),
            "ts": reply.ts,
            "received_at": reply.received_at,
            "boot": reply.boot,
            "seq": reply.seq,
        },
    }
