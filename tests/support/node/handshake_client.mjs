// A 2025-11-25 MCP client on the TypeScript SDK 1.x (tests/support/ts_client.py runs it):
// it connects to argv[2] over Streamable HTTP, holds one conversation and prints what it
// got as one JSON object on stdout. Whatever fails is named in "error" (exit status 1).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = new URL(process.argv[2]);
const report = { steps: {} };
const client = new Client({ name: "ts-handshake-client", version: "1.0.0" }, { capabilities: {} });
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
  report.protocolVersion = transport.protocolVersion ?? null;
  report.sessionId = transport.sessionId ?? null;
  report.serverInfo = client.getServerVersion() ?? null;
  await step("tools/list", async () => (await client.listTools()).tools.map((t) => t.name).sort());
  const progress = [];
  await step("tools/call", async () => {
    const result = await client.callTool(
      { name: "count", arguments: { n: 2, delay: 0.05 } },
      undefined,
      { onprogress: (p) => progress.push([p.progress, p.total ?? null, p.message ?? null]) },
    );
    return { text: result.content[0].text, progress };
  });
  await step("resources/read", async () => (await client.readResource({ uri: process.argv[3] })).contents[0].text);
  await step("resources/read missing", async () => client.readResource({ uri: "test://nowhere" }));
  await step("prompts/get", async () => {
    const prompt = await client.getPrompt({ name: "describe", arguments: { topic: "proxies" } });
    return prompt.messages[0].content.text;
  });
  await step("ping", async () => client.ping());
  await transport.terminateSession();
  await client.close();
} catch (error) {
  report.error = String(error?.stack ?? error);
}
process.stdout.write(JSON.stringify(report) + "\n");
process.exit(report.error ? 1 : 0);
