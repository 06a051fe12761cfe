// Sends the calls in calls.json through @segment/analytics-node, unmodified,
// to the host given on the command line, then prints what happened as JSON.
//
//   node send.mjs <host-url> <write-key>
//
// A timestamp written as {"$date": "..."} is passed as a Date object; any
// other timestamp is passed through as the string it is.
import { readFileSync } from 'node:fs'
import { Analytics } from '@segment/analytics-node'

const [host, writeKey] = process.argv.slice(2)
if (!host || !writeKey) {
  console.error('usage: node send.mjs <host-url> <write-key>')
  process.exit(2)
}

const calls = JSON.parse(readFileSync(new URL('./calls.json', import.meta.url), 'utf8'))
const analytics = new Analytics({ writeKey, host, flushAt: 100, flushInterval: 1000, maxRetries: 3 })

const requests = []
const responses = []
analytics.on('http_request', (req) => {
  requests.push({ url: req.url, headers: req.headers, body: JSON.parse(req.body) })
})
analytics.on('http_response', (res) => responses.push(res.status))

const messageIds = []
const errors = []
calls.forEach((call, index) => {
  const params = { ...call.params }
  if (params.timestamp && typeof params.timestamp === 'object') {
    params.timestamp = new Date(params.timestamp.$date)
  }
  analytics[call.method](params, (err, ctx) => {
    messageIds[index] = ctx?.event?.messageId ?? null
    const failed = err ?? ctx?.failedDelivery()?.reason
    if (failed) errors.push(`${call.method}: ${failed}`)
  })
})

await analytics.closeAndFlush({ timeout: 30000 })
console.log(
  JSON.stringify({
    library: { name: '@segment/analytics-node', version: analytics.VERSION },
    node: process.version,
    messageIds,
    errors,
    requests,
    responses,
  }),
)
process.exit(errors.length ? 1 : 0)
