from twisted.application.service import ServiceMaker

phantomd = ServiceMaker(
    "phantomd",
    "phantomd.tap",
    "Phantom-token gateway: swaps opaque bearer tokens for JWTs.",
    "phantomd",
)
