// An MCP client on the official TypeScript SDK (tests/support/ts_client.py runs it):
// argv[2] "v1" (@modelcontextprotocol/sdk 1.x, 2025-11-25: initialize, sessions) or "v2"
// (@modelcontextprotocol/client 2.x pinned to 2026-07-28: stateless requests); it connects
// to argv[3] over Streamable HTTP, holds one conversation (argv[4]: a resource to read)
// and prints what it got as one JSON object on stdout. Whatever fails is named in
// "error" (exit status 1).
const [sdk, address, resourceUri] = process.argv.slice(2);
const v2 = sdk === "v2";
const { Client, StreamableHTTPClientTransport } = v2
  ? await import("@modelcontextprotocol/client")
  : {
      ...(await import("@modelcontextprotocol/sdk/client/index.js")),
      ...(await import("@modelcontextprotocol/sdk/client/streamableHttp.js")),
    };

const url = new URL(address);
const report = { steps: {} };
const options = { capabilities: {} };
if (v2) options.versionNegotiation = { mode: { pin: "2026-07-28" } };
const client = new Client({ name: `ts-${sdk}-client`, version: "1.0.0" }, options);
const transport = new StreamableHTTPClientTransport(url);

async function step(name, action) {
  try {
    report.steps[name] = { ok: true, value: await action() };
  } catch (error) {
    report.steps[name] = { ok: false, code: error?.code ?? null, message: String(error?.message ?? error) };
  }
}

try {
  await client.connect(transport);
  report.protocolVersion = transport.protocolVersion ?? client.getNegotiatedProtocolVersion?.() ?? null;
  report.sessionId = transport.sessionId ?? null;
  report.serverInfo = client.getServerVersion() ?? null;
  await step("tools/list", async () => (await client.listTools()).tools.map((t) => t.name).sort());
  const progress = [];
  await step("tools/call", async () => {
    const params = { name: "count", arguments: { n: 2, delay: 0.05 } };
    const options = {
      onprogress: (p) => progress.push([p.progress, p.total ?? null, p.message ?? null]),
    };
    // v1: callTool(params, resultSchema, options); v2: callTool(params, options).
    const result = v2
      ? await client.callTool(params, options)
      : await client.callTool(params, undefined, options);
    return { text: result.content[0].text, progress };
  });
  await step("resources/read", async () => (await client.readResource({ uri: resourceUri })).contents[0].text);
  await step("resources/read missing", async () => client.readResource({ uri: "test://nowhere" }));
  await step("prompts/get", async () => {
    const prompt = await client.getPrompt({ name: "describe", arguments: { topic: "proxies" } });
    return prompt.messages[0].content.text;
  });
  if (!v2) {
    await step("ping", async () => client.ping());
    await transport.terminateSession();
  }
  await client.close();
} catch (error) {
  report.error = String(error?.stack ?? error);
}
process.stdout.write(JSON.stringify(report) + "\n");
process.exit(report.error ? 1 : 0);
