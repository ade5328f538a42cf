// E2B's JavaScript SDK (npm, pinned by package-lock.json) against podvisord,
// a smaller set than the Python SDK's: create, commands (output, exit codes,
// envs, cwd, a background command killed), files, getHost with a request to
// a server in the sandbox, list with a metadata filter, setTimeout, connect,
// kill. The test gives PODVISORD_URL, PODVISORD_ADMIN_TOKEN and the
// directory the SDK is installed in (E2B_NODE_MODULES).
import http from 'node:http'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const url = process.env.PODVISORD_URL
const sdk = path.join(process.env.E2B_NODE_MODULES, 'e2b', 'dist', 'index.mjs')
const { Sandbox, CommandExitError } = await import(pathToFileURL(sdk).href)

function check(cond, what) {
  if (!cond) {
    console.error(`FAIL: ${what}`)
    process.exit(1)
  }
  console.log(`ok: ${what}`)
}

const made = await fetch(`${url}/admin/tenants`, {
  method: 'POST',
  headers: { 'X-Admin-Token': process.env.PODVISORD_ADMIN_TOKEN, 'Content-Type': 'application/json' },
  body: JSON.stringify({ name: 'sdk_js' }),
})
check(made.status === 201, `tenant made (${made.status})`)
process.env.E2B_API_KEY = (await made.json()).apiKey
process.env.E2B_API_URL = url
process.env.E2B_SANDBOX_URL = url

const sbx = await Sandbox.create({ metadata: { suite: 'sdk_js' }, envs: { WIDE: 'yes' } })
check(sbx.sandboxId.length > 0, `created ${sbx.sandboxId}`)

let r = await sbx.commands.run('echo hello; echo oops >&2')
check(r.stdout === 'hello\n' && r.stderr === 'oops\n' && r.exitCode === 0, `output ${JSON.stringify(r)}`)
r = await sbx.commands.run('echo $WIDE $MINE; pwd', { envs: { MINE: 'mine' }, cwd: '/tmp' })
check(r.stdout === 'yes mine\n/tmp\n', `envs and cwd ${JSON.stringify(r.stdout)}`)
try {
  await sbx.commands.run('exit 3')
  check(false, 'exit 3 throws')
} catch (e) {
  check(e instanceof CommandExitError && e.exitCode === 3, `exit 3 throws CommandExitError (${e})`)
}
r = await sbx.commands.run('whoami', { user: 'root' })
check(r.stdout === 'root\n', `user root ${JSON.stringify(r.stdout)}`)

const bg = await sbx.commands.run('sleep 60', { background: true })
check((await sbx.commands.list()).some((p) => p.pid === bg.pid), `background pid ${bg.pid} listed`)
check(await sbx.commands.kill(bg.pid), 'a background command killed')

await sbx.files.write('/home/user/js/a.txt', 'from js')
check((await sbx.files.read('/home/user/js/a.txt')) === 'from js', 'write then read')
const names = (await sbx.files.list('/home/user/js')).map((e) => e.name)
check(names.includes('a.txt'), `list ${names}`)
await sbx.files.rename('/home/user/js/a.txt', '/home/user/js/b.txt')
check(await sbx.files.exists('/home/user/js/b.txt'), 'rename')
await sbx.files.remove('/home/user/js')
check(!(await sbx.files.exists('/home/user/js')), 'remove')

// A server in the sandbox, reached at getHost(port) through podvisord.
await sbx.commands.run('mkdir -p /tmp/www && echo served > /tmp/www/index.txt')
await sbx.commands.run('cd /tmp/www && python3 -m http.server 8000', { background: true })
const host = sbx.getHost(8000)
check(host === `8000-${sbx.sandboxId}.${sbx.sandboxDomain}`, `getHost ${host}`)
const u = new URL(url)
function get(p) {
  return new Promise((resolve, reject) => {
    const req = http.get({ hostname: u.hostname, port: u.port, path: p, headers: { Host: host } }, (res) => {
      let body = ''
      res.on('data', (d) => (body += d))
      res.on('end', () => resolve({ status: res.statusCode, body }))
    })
    req.on('error', reject)
    req.setTimeout(20000, () => req.destroy(new Error('timed out')))
  })
}
let got
for (let i = 0; i < 150; i++) {
  got = await get('/index.txt')
  if (got.status === 200) break
  await new Promise((res) => setTimeout(res, 300))
}
check(got.status === 200 && got.body === 'served\n', `GET from the sandbox's server: ${JSON.stringify(got)}`)

const found = await Sandbox.list({ query: { metadata: { suite: 'sdk_js' } } }).nextItems()
check(found.some((s) => s.sandboxId === sbx.sandboxId), 'list with a metadata filter')
const none = await Sandbox.list({ query: { metadata: { suite: 'nope' } } }).nextItems()
check(!none.some((s) => s.sandboxId === sbx.sandboxId), 'a filter that matches nothing')

await sbx.setTimeout(120_000)
const info = await sbx.getInfo()
check(info.endAt - info.startedAt > 100_000, `setTimeout moved the end (${info.endAt - info.startedAt} ms)`)

const again = await Sandbox.connect(sbx.sandboxId)
r = await again.commands.run('echo again')
check(r.stdout === 'again\n', 'Sandbox.connect then run')

await sbx.kill()
const left = await Sandbox.list().nextItems()
check(!left.some((s) => s.sandboxId === sbx.sandboxId), 'killed sandbox gone from list')
console.log('PASS')
