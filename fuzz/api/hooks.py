"""schemathesis hooks for ./scripts/api-fuzz (loaded through SCHEMATHESIS_HOOKS).

A rule across two headers that OpenAPI 3.0 cannot state: X-Ember-Instance
routes a synchronous invocation, and emberd refuses it (400) beside
`X-Ember-Invocation-Type: Event` rather than ignore it. Requests combining
them are left out of generation, so the "schema-valid data is accepted"
check still holds for every other invocation; the refusal itself has an
integration test (integration/tests/events.rs).
"""

import schemathesis


@schemathesis.hook
def filter_case(context, case):
    if case.operation.path != "/functions/{name}/invoke" or not case.headers:
        return True
    headers = {name.lower(): value for name, value in case.headers.items()}
    return not (
        headers.get("x-ember-invocation-type") == "Event" and "x-ember-instance" in headers
    )
