fn main() -> std::process::ExitCode {
    ctwatch::run()
}
