-- wrk script: POST /v1/query for a random key of the authority benchmark's key space
-- (`stemedb bench --authority-grants 10000 --preload --keys 2000 --prefix auth` sets it up).
--   LENS=authority wrk -t1 -c64 -d10s -s docs/examples/wrk_query.lua http://127.0.0.1:18180
-- Environment: LENS (authority), CONSISTENCY (linearizable), PREFIX (auth), KEYS (2000).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local lens = os.getenv("LENS") or "authority"
local consistency = os.getenv("CONSISTENCY") or "linearizable"
local prefix = os.getenv("PREFIX") or "auth"
local keys = tonumber(os.getenv("KEYS") or "2000")
math.randomseed(os.time())

request = function()
  local body = string.format('{"concept_path":"%s/k%d","lens":"%s","consistency":"%s"}',
    prefix, math.random(0, keys - 1), lens, consistency)
  return wrk.format(nil, "/v1/query", nil, body)
end

done = function(summary, latency, requests)
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("p%s=%.2fms ", p, latency:percentile(p) / 1000))
  end
  io.write(string.format("max=%.2fms req/s=%.0f non-2xx=%d requests=%d\n", latency.max / 1000,
    summary.requests / (summary.duration / 1e6), summary.errors.status, summary.requests))
end
