"""The body of `POST /authorize` (and what forward-auth reads from headers), validated."""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from services.contract.events import INT64_MAX

#: A request id is stored with the hold, so no U+0000 (PostgreSQL text cannot hold it).
_REQUEST_ID_PATTERN: Final = r"^[^\x00]*$"


class RequestFields(BaseModel):
    """The fields of the client's own request body that check 11 needs; all optional."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: StrictStr | None = None
    size: StrictStr | None = None
    n: StrictInt | None = None
    input: StrictStr | list[StrictStr] | None = None


class AuthorizeRequest(BaseModel):
    """The body of POST /authorize. Types are strict: a wrong type is a validation error."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    authorization: StrictStr | None = None
    client_ip: StrictStr | None = None
    route: StrictStr | None = None
    model: StrictStr | None = None
    channel_id: StrictStr | StrictInt | None = None
    request: RequestFields = Field(default_factory=RequestFields)
    estimated_cost: Annotated[StrictInt, Field(gt=0, le=INT64_MAX)] | None = None
    request_id: (
        Annotated[StrictStr, Field(min_length=1, max_length=256, pattern=_REQUEST_ID_PATTERN)]
        | None
    ) = None
    #: Decide without holding or counting anything (no reservation, no rate-limit hit).
    dry_run: StrictBool = False


# ---------------------------------------------------------------------------------- the fast path
# `POST /authorize` bodies are decoded by msgspec into the structs below (about a microsecond);
# a body they refuse, or cannot hold, goes to `AuthorizeRequest`, which then decides: it accepts
# what it accepts (and the structs never accept more) and words the 400. tests/policy/
# test_request.py holds the two to the same verdict and the same values.


class RequestBody(msgspec.Struct, frozen=True, gc=False):
    """`RequestFields`, decoded by msgspec."""

    prompt: str | None = None
    size: str | None = None
    n: int | None = None
    input: str | list[str] | None = None


class AuthorizeBody(msgspec.Struct, frozen=True, gc=False):
    """`AuthorizeRequest`, decoded by msgspec: the same fields, types and bounds."""

    authorization: str | None = None
    client_ip: str | None = None
    route: str | None = None
    model: str | None = None
    channel_id: str | int | None = None
    request: RequestBody = msgspec.field(default_factory=RequestBody)
    estimated_cost: Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)] | None = None
    request_id: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=_REQUEST_ID_PATTERN)]
        | None
    ) = None
    dry_run: bool = False


#: What check 11 reads of the client's request, and what a decision reads of a request: either
#: type, whichever parsed it (their fields are the same).
RequestInput = RequestFields | RequestBody
AuthorizeInput = AuthorizeRequest | AuthorizeBody


_BODY: Final = msgspec.json.Decoder(AuthorizeBody)


def parse_authorize(body: bytes) -> AuthorizeInput:
    """A `POST /authorize` body, validated; raises pydantic's `ValidationError` for one that is
    not a valid request."""
    try:
        return _BODY.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        # RecursionError: nested deeper than msgspec goes; pydantic refuses it as a 400.
        return AuthorizeRequest.model_validate_json(body)
