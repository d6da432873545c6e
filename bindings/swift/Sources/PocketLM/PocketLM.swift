// PocketLM: load a model, generate, chat; a thin Swift layer over pocketlm.h.
//
// UNTESTED: written without a Swift toolchain (none was installable where it was written).
//
//     let model = try PocketLM.Model()                       // the default model
//     let answer = try model.generate("Write a haiku about the sea.", maxTokens: 64) { piece in
//         print(piece, terminator: ""); return true            // false stops
//     }
//     let chat = try PocketLM.Chat(model: model, system: "You are terse.")
//     print(try chat.send("Hi!"))

import CPocketLM

/// A failed call of the C API: its status code and message.
public struct PocketLMError: Error, CustomStringConvertible {
    /// The status the C function returned.
    public let status: PocketlmStatus
    /// `pocketlm_last_error()` right after the call.
    public let message: String

    public var description: String { message }
}

/// Throws the thread's last error when `status` is not OK.
private func check(_ status: PocketlmStatus) throws {
    if status != POCKETLM_STATUS_OK {
        let message = pocketlm_last_error().map { String(cString: $0) } ?? "unknown error"
        throw PocketLMError(status: status, message: message)
    }
}

/// Calls `body` with a C string for `s`, or NULL for nil.
private func withOptionalCString<R>(_ s: String?, _ body: (UnsafePointer<CChar>?) throws -> R)
    rethrows -> R
{
    guard let s else { return try body(nil) }
    return try s.withCString { try body($0) }
}

/// The closure a generation calls with each piece of text (return false to stop), passed to
/// C as `user_data`.
private final class PieceSink {
    let onText: ((String) -> Bool)?
    init(_ onText: ((String) -> Bool)?) { self.onText = onText }
}

private let forwardPiece: PocketlmTextCallback = { piece, len, userData in
    guard let piece, let userData else { return 0 }
    let sink = Unmanaged<PieceSink>.fromOpaque(userData).takeUnretainedValue()
    let bytes = UnsafeRawBufferPointer(start: UnsafeRawPointer(piece), count: Int(len))
    let text = String(decoding: bytes, as: UTF8.self)
    return (sink.onText?(text) ?? true) ? 0 : 1
}

/// Sampling and length settings; nil fields keep the model's defaults
/// (`pocketlm_generate_params_default`).
public struct GenerateParameters {
    public var maxTokens: Int = 256
    /// 0 is greedy (with `repetitionPenalty` 1, the CLI's `--temp 0`).
    public var temperature: Float? = nil
    public var topP: Float? = nil
    public var topK: Int? = nil
    public var minP: Float? = nil
    public var repetitionPenalty: Float? = nil
    public var seed: UInt64? = nil

    public init(maxTokens: Int = 256, temperature: Float? = nil) {
        self.maxTokens = maxTokens
        self.temperature = temperature
    }

    /// The C struct: the model's defaults with these fields applied.
    fileprivate func cParams(model: OpaquePointer) throws -> PocketlmGenerateParams {
        var p = PocketlmGenerateParams()
        try check(pocketlm_generate_params_default(model, &p))
        p.max_tokens = UInt32(maxTokens)
        if let temperature {
            p.temperature = temperature
            if temperature == 0 && repetitionPenalty == nil { p.repetition_penalty = 1 }
        }
        if let topP { p.top_p = topP }
        if let topK { p.top_k = UInt32(topK) }
        if let minP { p.min_p = minP }
        if let repetitionPenalty { p.repetition_penalty = repetitionPenalty }
        if let seed {
            p.seed = seed
            p.use_seed = true
        }
        return p
    }
}

/// A loaded model (`PocketlmModel`); safe to share between threads.
public final class Model: @unchecked Sendable {
    let handle: OpaquePointer

    /// Loads a `.gguf` file, a Hugging Face / MLX folder or a hub id; nil loads the default
    /// model (downloaded on first use).
    public init(path: String? = nil) throws {
        var out: OpaquePointer? = nil
        try withOptionalCString(path) { try check(pocketlm_model_load($0, nil, &out)) }
        guard let out else { throw PocketLMError(status: POCKETLM_STATUS_PANIC, message: "no handle") }
        handle = out
    }

    deinit { pocketlm_model_free(handle) }

    /// Token ids of `text`.
    public func tokenize(_ text: String, addSpecialTokens: Bool = true) throws -> [UInt32] {
        var ids: UnsafeMutablePointer<UInt32>? = nil
        var len = 0
        try text.withCString {
            try check(pocketlm_tokenize(handle, $0, addSpecialTokens, &ids, &len))
        }
        defer { pocketlm_tokens_free(ids, len) }
        return Array(UnsafeBufferPointer(start: ids, count: len))
    }

    /// The text of `ids`.
    public func detokenize(_ ids: [UInt32], skipSpecialTokens: Bool = false) throws -> String {
        var text: UnsafeMutablePointer<CChar>? = nil
        try ids.withUnsafeBufferPointer {
            try check(pocketlm_detokenize(handle, $0.baseAddress, $0.count, skipSpecialTokens, &text))
        }
        defer { pocketlm_string_free(text) }
        return text.map { String(cString: $0) } ?? ""
    }

    /// The answer to `prompt` (a user message through the chat template); `onText` gets each
    /// piece as it is generated and returns false to stop.
    public func generate(
        _ prompt: String, parameters: GenerateParameters = GenerateParameters(),
        onText: ((String) -> Bool)? = nil
    ) throws -> String {
        var params = try parameters.cParams(model: handle)
        let sink = PieceSink(onText)
        var text: UnsafeMutablePointer<CChar>? = nil
        try prompt.withCString { p in
            try withExtendedLifetime(sink) {
                try check(
                    pocketlm_generate(
                        handle, p, &params, forwardPiece,
                        Unmanaged.passUnretained(sink).toOpaque(), nil, &text))
            }
        }
        defer { pocketlm_string_free(text) }
        return text.map { String(cString: $0) } ?? ""
    }
}

/// A conversation that keeps its KV cache between turns (`PocketlmChat`); one thread at a
/// time.
public final class Chat {
    let handle: OpaquePointer
    let model: Model

    public init(model: Model, system: String? = nil, parameters: GenerateParameters = GenerateParameters()) throws {
        self.model = model
        var params = try parameters.cParams(model: model.handle)
        var out: OpaquePointer? = nil
        try withOptionalCString(system) { s in
            params.system = s
            try check(pocketlm_chat_new(model.handle, &params, &out))
        }
        guard let out else { throw PocketLMError(status: POCKETLM_STATUS_PANIC, message: "no handle") }
        handle = out
    }

    deinit { pocketlm_chat_free(handle) }

    /// Answers a user message; the reply joins the history.
    public func send(_ text: String, onText: ((String) -> Bool)? = nil) throws -> String {
        let sink = PieceSink(onText)
        var reply: UnsafeMutablePointer<CChar>? = nil
        try text.withCString { t in
            try withExtendedLifetime(sink) {
                try check(
                    pocketlm_chat_send(
                        handle, t, forwardPiece, Unmanaged.passUnretained(sink).toOpaque(), nil,
                        &reply))
            }
        }
        defer { pocketlm_string_free(reply) }
        return reply.map { String(cString: $0) } ?? ""
    }

    /// Forgets the conversation (the system message stays).
    public func reset() throws { try check(pocketlm_chat_reset(handle)) }
}
