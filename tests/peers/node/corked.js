// node-postgres (`pg`) as a traced client: it corks its socket around each
// parameterised query, so every statement leaves as one writev with one
// iovec per protocol message. Prints what it ran, once every reply is in.
//   node corked.js HOST PORT INSERTS EXECUTIONS
const { Client } = require("pg");

async function main() {
  const [host, port, inserts, executions] = process.argv.slice(2);
  const client = new Client({ host, port: Number(port), user: "postgres", database: "postgres" });
  await client.connect();
  await client.query("CREATE TEMP TABLE corked (id int PRIMARY KEY, note text)");
  for (let i = 0; i < Number(inserts); i++) {
    await client.query("INSERT INTO corked (id, note) VALUES ($1, $2)", [i, `note-${i}`]);
  }
  let rows = 0;
  for (let i = 0; i < Number(executions); i++) {
    const r = await client.query({
      name: "by-id",
      text: "SELECT note FROM corked WHERE id = $1",
      values: [i],
    });
    rows += r.rowCount;
  }
  await client.end();
  console.log(JSON.stringify({ inserts: Number(inserts), executions: Number(executions), rows }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
