"""The body of `POST /authorize` (and what forward-auth reads from headers), validated."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from services.contract.events import INT64_MAX


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
    #: Stored with the hold, so no U+0000 (PostgreSQL text cannot hold it).
    request_id: (
        Annotated[StrictStr, Field(min_length=1, max_length=256, pattern=r"^[^\x00]*$")] | None
    ) = None
    #: Decide without holding or counting anything (no reservation, no rate-limit hit).
    dry_run: StrictBool = False
