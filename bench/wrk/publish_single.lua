-- wrk script: one message per POST /publish, ~120 bytes of data, spread over 10,000 topics.
--   taskset -c 1 wrk -t1 -c32 -d20s -s bench/wrk/publish_single.lua http://127.0.0.1:PORT/publish
-- Env: TOPICS (default 10000), TOKEN (a publish token, sent as Authorization: Bearer).
local topics = tonumber(os.getenv("TOPICS") or "10000")
local token = os.getenv("TOKEN")
local data = string.rep("x", 100)
local bodies = {}

function init(args)
  -- Pre-built bodies: the client should not be what is measured.
  for i = 1, 1000 do
    local t = math.random(0, topics - 1)
    bodies[i] = '{"topic":"m.' .. t .. '","data":{"p":' .. i .. ',"s":"' .. data .. '"}}'
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if token then wrk.headers["Authorization"] = "Bearer " .. token end
end

local n = 0
function request()
  n = n % 1000 + 1
  return wrk.format(nil, nil, nil, bodies[n])
end

-- Answers other than 200: the first 5 of each thread are written to stderr (wrk itself
-- counts statuses >= 400 as "Non-2xx or 3xx responses"; a 1xx/3xx would only show here).
local bad = 0
function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
    if bad <= 5 then
      io.stderr:write("status " .. status .. ": " .. string.sub(body or "", 1, 300) .. "\n")
    end
  end
end

-- One machine-readable line after wrk's own report (bench/ingest.py reads it; times in us).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"duration_us":%d,"requests":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"lat_max_us":%d,' ..
    '"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_p999_us":%d}\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
