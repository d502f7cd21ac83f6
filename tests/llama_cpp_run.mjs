// Runs a GGUF file with llama.cpp (node-llama-cpp's prebuilt CPU binaries) on given token ids.
// usage: node llama_cpp_run.mjs <node-llama-cpp folder> <model.gguf> '<json: [prompt token ids]>' <new tokens> <top k>
//        '<json: [texts]>'
// prints JSON: {"tokens": greedy continuation's ids, "top": per step [[id, log-probability], ...] (k best, best first),
//               "tokenized": each text's ids from llama.cpp's tokenizer (no special tokens added)}
import path from "node:path";
import { pathToFileURL } from "node:url";

const [folder, modelPath, promptJson, steps, topK, textsJson] = process.argv.slice(2);
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(path.join(folder, "node_modules", "node-llama-cpp",
    "dist", "index.js")).href);
// only the prebuilt binaries: no download, no build
const llama = await getLlama({ gpu: false, build: "never", usePrebuiltBinaries: true, skipDownload: true,
    progressLogs: false, logLevel: LlamaLogLevel.error, maxThreads: 1 });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
// an f32 KV cache (llama.cpp keeps f16 by default): the comparison with HF is of the model, not of the cache
const context = await model.createContext({ contextSize: 64, batchSize: 64, threads: 1,
    experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32" });
const sequence = context.getSequence();
const out = { tokens: [], top: [], tokenized: JSON.parse(textsJson).map((text) => model.tokenize(text)) };
const generator = sequence.evaluateWithMetadata(JSON.parse(promptJson), { probabilities: true }, { temperature: 0 });
for await (const { token, probabilities } of generator) {
    out.tokens.push(token);
    out.top.push([...probabilities].sort((a, b) => b[1] - a[1]).slice(0, Number(topK))
        .map(([id, p]) => [id, Math.log(p)]));
    if (out.tokens.length >= Number(steps)) break;
}
process.stdout.write(JSON.stringify(out));
await context.dispose();
await model.dispose();
await llama.dispose();
