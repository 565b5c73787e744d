-- wrk script: print the run's summary as one JSON line (prefixed WRK_JSON), so that
-- proxy_throughput.py reads numbers instead of parsing wrk's human-readable text.
-- Only `done` is defined: a `response` hook would run Lua for every response and slow wrk.
-- Latencies are in microseconds; %.0f rather than %d so that any Lua version accepts floats.

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, ' ..
    '"connect": %.0f, "read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f, ' ..
    '"p50_us": %.0f, "p90_us": %.0f, "p99_us": %.0f, "max_us": %.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
