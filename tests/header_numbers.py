"""hypothesis strategies for numbers in the tracking header: the text of any number Python's
json reads, and header values with such numbers wherever the parser reads a number (or
meets one where something else belongs)."""

from __future__ import annotations

import json

from hypothesis import strategies as st

# Integers of any size, up to and past json's 4300-digit limit; every float, NaN and the
# infinities as Python's json writes them; exponents far past a float's range either way.
number_texts = st.one_of(
    st.integers().map(str),
    st.integers(-(10**420), 10**420).map(str),
    st.integers(4290, 4310).map(lambda digits: "9" * digits),
    st.floats().map(json.dumps),
    st.builds("{}e{}".format, st.integers(-(10**6), 10**6), st.integers(-(10**6), 10**6)),
    st.builds("{}.{}E+{}".format, st.integers(0, 9), st.integers(0, 10**20), st.integers(300, 400)),
)

# Each place holds up to three numbers, n0 to n2, and the event's name.
NUMBER_PLACES = (
    '{{"event_name": "{name}", "custom_data": {{"value": {n0}}}}}',
    '{{"event_name": "{name}", "custom_data": {{"num_items": {n0}, "order_id": {n1}}}}}',
    '{{"event_name": "{name}", "custom_data": {{"shelf": {{"n": [{n0}, {n1}]}}, "currency": {n2}}}}}',
    '{{"event_name": "{name}", "event_time": {n0}}}',
    '{{"event_name": "{name}", "contents": [{{"id": {n0}, "quantity": {n1}, "item_price": {n2}}}]}}',
    '{{"event_name": "{name}", "event_id": {n0}, "user_data": {{"em": [{n1}]}}}}',
    '[{{"event_name": "{name}"}}, {n0}]',
    '{{"event_name": {n0}}}',
)


def numbered_values(name: str = "Purchase") -> st.SearchStrategy[bytes]:
    """Tracking header values of one or two events named C{name}, with any numbers in them."""
    return st.builds(
        lambda place, n: place.format(name=name, n0=n[0], n1=n[1], n2=n[2]).encode(),
        st.sampled_from(NUMBER_PLACES),
        st.lists(number_texts, min_size=3, max_size=3),
    )
