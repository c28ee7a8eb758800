"""Registering a gRPC service whose requests are decoded tolerantly.

The generated ``add_*Servicer_to_server`` functions decode requests with ``FromString``; a
malformed message, or a proto3 string field holding invalid UTF-8, then raises inside gRPC and
the caller gets UNKNOWN ("Unexpected DecodeError"), and in a stream the whole stream ends.
Here every request type is decoded by a function that turns a ``DecodeError`` into a
``Malformed`` value instead, so the handler answers INVALID_ARGUMENT for that one message and,
in a stream, goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from service.server.errors import ServingError, invalid


@dataclass(frozen=True)
class Malformed:
    """A request message that did not decode."""

    message_type: str
    reason: str

    def error(self) -> ServingError:
        return invalid(f"request: not a valid {self.message_type} message ({self.reason}); "
                       "check the client's protos and that string fields are UTF-8")


def tolerant(message_class: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def decode(data: bytes) -> Message | Malformed:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            reason = (str(error).splitlines() or ["undecodable"])[0][:200]
            return Malformed(message_class.DESCRIPTOR.full_name, reason)
    return decode


_HANDLER = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(server: grpc.aio.Server, module: Any, service_name: str, servicer: Any, *,
                 refused: Callable[[ServingError], None]) -> None:
    """Register ``servicer`` for ``service_name`` (a service of the generated ``module``), with
    tolerant request decoding. Methods are taken from the service descriptor. A malformed
    request of a unary method is answered INVALID_ARGUMENT before the servicer sees it (and
    counted with ``refused``); streaming methods get ``Malformed`` items and answer each."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_class = getattr(module, method.input_type.name)
        response_class = getattr(module, method.output_type.name)
        factory = _HANDLER[(method.client_streaming, method.server_streaming)]
        behaviour = getattr(servicer, method.name)
        if not method.client_streaming:
            behaviour = _rejecting_malformed(behaviour, refused)
        handlers[method.name] = factory(
            behaviour, request_deserializer=tolerant(request_class),
            response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _rejecting_malformed(behaviour: Callable[..., Any], refused: Callable[[ServingError], None]
                         ) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            error = request.error()
            refused(error)
            await context.abort(error.code, error.message)
        return await behaviour(request, context)
    return handle
