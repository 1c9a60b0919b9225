"""Fuzz property (issue #27): the request parsers answer every number JSON can carry (huge ints,
floats at the edges, bools, NaN spellings) with a request or an ApiError 400, never another
exception."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from stlm.serve.apierror import ApiError
from stlm.serve.chat_protocol import parse_chat_request
from stlm.serve.protocol import parse_completion_request

FIELDS = ["seed", "max_tokens", "top_k", "temperature", "top_p", "min_p", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "n", "best_of", "logprobs"]  # fmt: skip
numbers = st.one_of(
    st.integers(min_value=-(10**420), max_value=10**420),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**400, -(10**400)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
raw_numbers = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 401, "1e-999", "-0"])


def _parse(body: bytes, chat: bool) -> None:
    try:
        (parse_chat_request if chat else parse_completion_request)(body)
    except ApiError as exc:
        assert exc.status == 400, exc


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), numbers, max_size=4), st.booleans())
def test_any_number_is_parsed_or_a_400(fields: dict[str, object], chat: bool) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    if chat:
        fields.pop("best_of", None)
        fields.pop("logprobs", None)
    _parse(json.dumps({**body, **fields}).encode(), chat)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIELDS), raw_numbers, st.dictionaries(st.sampled_from(["1", "0", "99999999999"]), numbers))
def test_odd_number_spellings_and_biases(field: str, raw: str, bias: dict[str, object]) -> None:
    _parse(f'{{"prompt": "hi", "{field}": {raw}}}'.encode(), False)
    _parse(json.dumps({"prompt": "hi", "logit_bias": bias}).encode(), False)
