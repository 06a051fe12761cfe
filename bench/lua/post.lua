-- wrk script: POST Segment-style track events, each with a unique messageId.
--
--   wrk -t1 -c100 -d3s -s bench/lua/post.lua http://127.0.0.1:PORT -- MODE SIZE RUN
--
-- MODE is "track" (one event per POST to /v1/track) or "batch" (SIZE events per
-- POST to /v1/batch).  RUN is a tag that keeps messageIds unique across runs.
-- At the end one line of JSON is printed, prefixed with "RESULT ".
-- The event shape must match bench/workload.py.

local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

local mode, size, run
local counter = 0
local path
local headers = {
  ["Content-Type"] = "application/json",
  ["Authorization"] = "Basic V1JJVEVfS0VZOg==",
  ["User-Agent"] = "analytics-python/2.3.3",
}
local now
local agents = {
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
  "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
}

function init(args)
  mode = args[1] or "track"
  size = tonumber(args[2] or "100")
  run = args[3] or "run"
  if mode == "batch" then
    path = "/v1/batch"
  else
    path = "/v1/track"
    size = 1
  end
  now = os.date("!%Y-%m-%dT%H:%M:%S.000Z")
end

local function event(n)
  local user = n % 5000
  return string.format(
    '{"type":"track","messageId":"%s-%d-%d","userId":"user-%d","event":"Order Completed",'
      .. '"properties":{"orderId":"order-%d","revenue":42.5,"currency":"EUR","coupon":"SUMMER",'
      .. '"products":[{"sku":"SKU-1042","name":"Trail shoe","price":19.99,"quantity":1},'
      .. '{"sku":"SKU-2210","name":"Rain jacket","price":22.51,"quantity":1}]},'
      .. '"context":{"library":{"name":"analytics-python","version":"2.3.3"},'
      .. '"userAgent":"%s","locale":"en-GB",'
      .. '"page":{"path":"/checkout","url":"https://shop.example/checkout"}},'
      .. '"timestamp":"%s"}',
    run, tid, n, user, n, agents[n % 4 + 1], now
  )
end

function request()
  local body
  if size == 1 then
    counter = counter + 1
    body = event(counter)
  else
    local parts = {}
    for i = 1, size do
      counter = counter + 1
      parts[i] = event(counter)
    end
    body = '{"batch":[' .. table.concat(parts, ",") .. '],"sentAt":"' .. now .. '"}'
  end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean
  ))
end
