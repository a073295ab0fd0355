// A node-opcua server for tests/test_opcua_refusals.py: a PLC that refuses secured connections the
// way node-opcua does (a ServiceFault in place of the OpenSecureChannelResponse).
//
//   node server.mjs '{"port": 4840, "certificate": "plc.pem", "privateKey": "plc-key.pem",
//                     "pki": "pki-dir", "applicationUri": "urn:...", "modes": ["SignAndEncrypt"],
//                     "users": {"edge-01": "s3cret"}}'
//
// port: where to listen (path /reactors). certificate, privateKey: the server's own (PEM).
// pki: node-opcua's certificate store: a client certificate is trusted only when it is in
// <pki>/trusted/certs (files there are picked up while the server runs); an unknown one is refused
// (BadSecurityChecksFailed) and put into <pki>/rejected. <pki>-users holds the (unused) store of
// user certificates. modes: security modes of the endpoints
// (Basic256Sha256 only); without "None" there is no endpoint for unsecured discovery either.
// users: user names and passwords; with users, anonymous sessions are refused.
//
// Prints one line of JSON, {"ready": true, "endpoint": ...}, once it listens: the only output on
// standard output (node-opcua's own log goes to standard error). Stops on SIGTERM, SIGINT, or when
// its standard input closes (the test process went away).

import process from "node:process";
import {
    DataType,
    MessageSecurityMode,
    OPCUACertificateManager,
    OPCUAServer,
    SecurityPolicy,
    Variant,
} from "node-opcua";

console.log = console.info = console.warn = console.error; // keep stdout for the ready line

const options = JSON.parse(process.argv[2] ?? "{}");
const users = options.users ?? null;

const serverCertificateManager = new OPCUACertificateManager({
    rootFolder: options.pki,
    automaticallyAcceptUnknownCertificate: false,
});
// Without its own, the server shares one store of user certificates, and its lock, with every
// node-opcua process of the machine (in ~/.config): servers started at once wait for each other.
const userCertificateManager = new OPCUACertificateManager({
    rootFolder: `${options.pki}-users`,
    automaticallyAcceptUnknownCertificate: false,
});
await Promise.all([serverCertificateManager.initialize(), userCertificateManager.initialize()]);

const server = new OPCUAServer({
    port: options.port,
    hostname: "127.0.0.1",
    resourcePath: "/reactors",
    certificateFile: options.certificate,
    privateKeyFile: options.privateKey,
    serverCertificateManager,
    userCertificateManager,
    serverInfo: { applicationUri: options.applicationUri, applicationName: { text: "node-opcua test PLC" } },
    securityModes: (options.modes ?? ["SignAndEncrypt"]).map((m) => MessageSecurityMode[m]),
    securityPolicies: [SecurityPolicy.Basic256Sha256],
    allowAnonymous: users === null,
    userManager: users === null ? undefined : { isValidUser: (name, password) => users[name] === password },
    disableDiscovery: true,
});
await server.initialize();

const namespace = server.engine.addressSpace.registerNamespace("urn:ninu:plant-1:reactors");
const reactor = namespace.addObject({
    organizedBy: server.engine.addressSpace.rootFolder.objects,
    nodeId: "s=ReactorA",
    browseName: "ReactorA",
});
namespace.addVariable({
    componentOf: reactor,
    nodeId: "s=ReactorA.Temperature",
    browseName: "Temperature",
    dataType: "Double",
    value: { get: () => new Variant({ dataType: DataType.Double, value: 21.5 }) },
});

await server.start();
process.stdout.write(JSON.stringify({ ready: true, endpoint: server.getEndpointUrl() }) + "\n");

let stopping = false;
async function stop() {
    if (stopping) return;
    stopping = true;
    await server.shutdown(0);
    await Promise.all([serverCertificateManager.dispose(), userCertificateManager.dispose()]);
    process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
process.stdin.on("end", stop);
process.stdin.on("close", stop);
process.stdin.resume();
