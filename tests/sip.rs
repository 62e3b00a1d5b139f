//! SIP calls end to end: a real SIP phone (baresip, Debian's `baresip-core`) dials the server's
//! SIP endpoint and hears the echo engine back over RTP in G.711, G.722 and Opus; raw
//! datagrams check the refusals, the answer's retransmission and the server's own hang-up.

mod common;

use common::{ServerOptions, TestServer, eventually};
use duplex::gateway::sip::offer::SipCodec;
use duplex::gateway::sip::register::RegisterSettings;
use duplex::gateway::sip::{self, SipServer, SipSettings, SipTls};
use ipnet::IpNet;
use md5::{Digest, Md5};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::net::UdpSocket;

const SENTENCE: &str =
    "Hello, this is a test of the full duplex voice agent over a phone line. Can you hear me?";

/// SIP settings on a loopback port, answering `allow`.
fn settings(allow: Vec<IpNet>) -> SipSettings {
    SipSettings {
        bind: "127.0.0.1:0".parse().unwrap(),
        allow,
        register: None,
        codecs: SipCodec::ALL.to_vec(),
        tls: None,
        caller_auth: None,
        tls_client: None,
    }
}

/// The test server with SIP on a loopback port.
async fn start(options: ServerOptions, allow: Vec<IpNet>) -> (TestServer, SocketAddr) {
    let (server, sip) = start_sip(options, settings(allow)).await;
    (server, sip.udp)
}

/// `settings` with SIP over TLS on a loopback port, and the self-signed certificate it shows.
async fn with_tls(settings: SipSettings) -> (SipSettings, duplex::gateway::tls::TlsSetup) {
    use duplex::gateway::tls::{self, TlsSource};
    let dir = common::scratch_dir("sip-tls");
    let certificate = tls::setup(&TlsSource::SelfSigned { dir }).await.unwrap();
    let tls = SipTls {
        bind: "127.0.0.1:0".parse().unwrap(),
        config: certificate.config.get_inner(),
    };
    let settings = SipSettings {
        tls: Some(tls),
        ..settings
    };
    (settings, certificate)
}

/// Where the test server's SIP answers.
struct SipAddrs {
    udp: SocketAddr,
    tls: Option<SocketAddr>,
}

async fn start_sip(options: ServerOptions, settings: SipSettings) -> (TestServer, SipAddrs) {
    let server = TestServer::start(options).await;
    let sip = SipServer::bind(&settings, server.state.clone())
        .await
        .unwrap();
    server.state.set_dialer(sip.dialer());
    let addrs = SipAddrs {
        udp: sip.local_addr().unwrap(),
        tls: sip.tls_addr(),
    };
    tokio::spawn(sip.run());
    (server, addrs)
}

/// What baresip recorded of one call: what it sent and what it heard, at `rate`.
struct PhoneCall {
    sent: Vec<f32>,
    heard: Vec<f32>,
    rate: u32,
    log: String,
}

/// A phone that speaks one codec: its baresip module, and the rate and channels its sound
/// runs at (baresip's Opus is stereo, as RFC 7587 names it).
#[derive(Clone, Copy)]
struct Phone {
    module: &'static str,
    rate: u32,
    channels: u16,
    /// Parameters of its account (`;mediaenc=srtp-mand`: SRTP or no call).
    account: &'static str,
}

const G711_PHONE: Phone = Phone {
    module: "g711.so",
    rate: 8000,
    channels: 1,
    account: "",
};
const G722_PHONE: Phone = Phone {
    module: "g722.so",
    rate: 16000,
    channels: 1,
    account: "",
};
const OPUS_PHONE: Phone = Phone {
    module: "opus.so",
    rate: 48000,
    channels: 2,
    account: "",
};
/// A phone with the account `--sip-caller-auth pbx:s3cret` asks for.
const AUTHENTICATED_PHONE: Phone = Phone {
    account: ";auth_user=pbx;auth_pass=s3cret",
    ..G711_PHONE
};
const SRTP_PHONE: Phone = Phone {
    account: ";mediaenc=srtp-mand",
    ..G711_PHONE
};

/// Dials `uri` with baresip speaking only `phone`'s codec, playing `wav` (made for the phone
/// by `speech_wav`) until it ends, then hanging up.
fn baresip_call(uri: &str, phone: Phone, wav: &Path, seconds: u32, config: &str) -> PhoneCall {
    let dial = ["-e".to_owned(), format!("/dial {uri}")];
    run_baresip(phone, wav, seconds, config, "127.0.0.1:0", &dial, "")
}

/// baresip listening on `listen` (UDP and TCP; TLS on the next port with a `sip_certificate`
/// in `config`), answering the first call at once and playing `wav` into it; it hangs up
/// when it quits after `seconds`.
fn baresip_answering(
    listen: SocketAddr,
    phone: Phone,
    wav: &Path,
    seconds: u32,
    config: &str,
) -> PhoneCall {
    let listen = listen.to_string();
    run_baresip(
        phone,
        wav,
        seconds,
        config,
        &listen,
        &[],
        ";answermode=auto",
    )
}

fn run_baresip(
    phone: Phone,
    wav: &Path,
    seconds: u32,
    config: &str,
    listen: &str,
    args: &[String],
    answer_mode: &str,
) -> PhoneCall {
    let dir = common::scratch_dir("baresip");
    let recordings = dir.join("rec");
    std::fs::create_dir_all(&recordings).unwrap();
    let config = format!(
        "poll_method\t\tepoll\nsip_listen\t\t{listen}\naudio_player\t\taufile,/dev/null\n\
audio_source\t\taufile,{}\naudio_alert\t\taufile,/dev/null\naudio_srate\t\t{}\n\
audio_channels\t\t{}\nmodule_path\t\t/usr/lib/baresip/modules\nmodule\t\t\t{}\n\
module\t\t\taufile.so\nmodule\t\t\tsndfile.so\nmodule\t\t\tsrtp.so\nsnd_path\t\t{}\n\
module_app\t\taccount.so\n\
module_app\t\tmenu.so\n{config}",
        wav.display(),
        phone.rate,
        phone.channels,
        phone.module,
        recordings.display()
    );
    std::fs::write(dir.join("config"), config).unwrap();
    let account = format!(
        "<sip:tester@127.0.0.1;transport=udp>;regint=0{}{answer_mode}\n",
        phone.account
    );
    std::fs::write(dir.join("accounts"), account).unwrap();
    std::fs::write(dir.join("contacts"), "").unwrap();
    let output = Command::new("baresip")
        .arg("-f")
        .arg(&dir)
        .args(args)
        .args(["-t", &seconds.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("baresip runs (Debian's baresip-core: bash .ci/setup test)");
    let log = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let dump = |suffix: &str| {
        std::fs::read_dir(&recordings)
            .unwrap()
            .map_while(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.to_string_lossy().ends_with(suffix))
            .map(|path| read_wav(&path))
            .unwrap_or_default()
    };
    let (sent, rate) = dump("-enc.wav");
    PhoneCall {
        sent,
        heard: dump("-dec.wav").0,
        rate,
        log,
    }
}

/// A WAV file's first channel and its rate.
fn read_wav(path: &Path) -> (Vec<f32>, u32) {
    let mut reader = hound::WavReader::open(path).unwrap();
    let spec = reader.spec();
    let samples = reader
        .samples::<i16>()
        .step_by(spec.channels.into())
        .map(|s| f32::from(s.unwrap()) / 32768.0)
        .collect();
    (samples, spec.sample_rate)
}

/// Speech as a WAV for `phone`'s file source (the same on every channel).
fn speech_wav(phone: Phone) -> PathBuf {
    let raw = common::espeak_raw(SENTENCE, "signed", phone.rate).expect("espeak-ng and sox");
    let name = format!("speech-{}-{}.wav", phone.rate, phone.channels);
    let path = common::scratch_dir("sip-speech").join(name);
    let spec = hound::WavSpec {
        channels: phone.channels,
        sample_rate: phone.rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(&path, spec).unwrap();
    for pair in raw.chunks_exact(2) {
        for _ in 0..phone.channels {
            writer
                .write_sample(i16::from_le_bytes([pair[0], pair[1]]))
                .unwrap();
        }
    }
    writer.finalize().unwrap();
    path
}

/// Calls the echo engine from `phone` at `uri` (with `config` lines added to baresip's);
/// returns the call once baresip has hung up, with the echo's correlation checked.
async fn echo_call_at(uri: String, phone: Phone, config: String) -> PhoneCall {
    let wav = speech_wav(phone);
    let call = tokio::task::spawn_blocking(move || baresip_call(&uri, phone, &wav, 12, &config))
        .await
        .unwrap();
    assert!(
        call.log.contains("Call established"),
        "baresip's log:\n{}",
        call.log
    );
    assert!(
        call.heard.len() > call.rate as usize * 3,
        "{} samples heard; baresip's log:\n{}",
        call.heard.len(),
        call.log
    );
    let (correlation, lag_ms) = common::echo_correlation(&call.sent, &call.heard, call.rate);
    eprintln!(
        "echo over SIP ({}): correlation {correlation:.3} at {lag_ms:.0} ms",
        phone.module
    );
    assert!(correlation > 0.6, "correlation {correlation}");
    call
}

/// Calls the echo engine's SIP at `server_sip` from `phone`, `uri_params` added to the URI
/// (`;transport=tcp`).
async fn echo_call(server_sip: SocketAddr, phone: Phone, uri_params: &str) -> PhoneCall {
    let uri = format!("sip:NATM1@{server_sip}{uri_params}");
    echo_call_at(uri, phone, String::new()).await
}

/// The share of a signal's energy above `cutoff_hz`: a fourth-order Butterworth high-pass
/// (two second-order sections, RBJ's cookbook) over the whole signal.
fn share_above(samples: &[f32], rate: u32, cutoff_hz: f32) -> f32 {
    let w0 = 2.0 * std::f32::consts::PI * cutoff_hz / rate as f32;
    let mut filtered = samples.to_vec();
    for q in [0.5412, 1.3066] {
        let alpha = w0.sin() / (2.0 * q);
        let cos = w0.cos();
        let a0 = 1.0 + alpha;
        let b = [
            (1.0 + cos) / 2.0 / a0,
            -(1.0 + cos) / a0,
            (1.0 + cos) / 2.0 / a0,
        ];
        let a = [-2.0 * cos / a0, (1.0 - alpha) / a0];
        let (mut x1, mut x2, mut y1, mut y2) = (0.0, 0.0, 0.0, 0.0);
        for sample in &mut filtered {
            let x = *sample;
            let y = b[0] * x + b[1] * x1 + b[2] * x2 - a[0] * y1 - a[1] * y2;
            (x2, x1, y2, y1) = (x1, x, y1, y);
            *sample = y;
        }
    }
    let energy = |s: &[f32]| s.iter().map(|x| x * x).sum::<f32>();
    energy(&filtered) / energy(samples).max(f32::MIN_POSITIVE)
}

/// After a phone's call: no packet came bad, the call's slot is free again, and the server
/// stops.
async fn ends_cleanly(server: TestServer) {
    assert_eq!(server.metrics.packets_bad.get(), 0);
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    server.stop().await;
}

/// A wideband phone's echo keeps the speech above 4 kHz that G.711 cannot carry: it came
/// through the server in wideband both ways.
async fn wideband_echo(phone: Phone) {
    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    let call = echo_call(sip, phone, "").await;
    let sent = share_above(&call.sent, call.rate, 4500.0);
    let heard = share_above(&call.heard, call.rate, 4500.0);
    eprintln!(
        "{}: energy above 4.5 kHz, sent {sent:.4}, heard {heard:.4}",
        phone.module
    );
    assert!(
        sent > 0.005,
        "the test speech has energy above 4.5 kHz: {sent}"
    );
    assert!(
        heard > 0.4 * sent,
        "heard {heard} of sent {sent} above 4.5 kHz"
    );
    ends_cleanly(server).await;
}

/// The phone's SIP over TCP (as a PBX sends an INVITE too big for a datagram): answered on
/// its connection, the call's requests kept on it, its BYE ending the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sip_phone_calls_over_tcp() {
    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    echo_call(sip, G711_PHONE, ";transport=tcp").await;
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    assert_eq!(
        server
            .metrics
            .calls_started
            .with_label_values(&["sip"])
            .get(),
        1
    );
    server.stop().await;
}

/// A phone that insists on SRTP (SDES keys in its offer, RTP/SAVP) hears itself: each side
/// decrypts what the other encrypts, or the phone would drop every packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_that_insists_on_srtp_hears_itself() {
    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    let call = echo_call(sip, SRTP_PHONE, "").await;
    assert!(call.log.contains("SRTP is Enabled"), "{}", call.log);
    ends_cleanly(server).await;
}

/// A secure trunk: SIP over TLS (our self-signed certificate, which the phone trusts) and
/// SRTP; the phone's BYE ends the call over the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_calls_over_tls_with_srtp() {
    let (secure, certificate) = with_tls(settings(sip::private_networks())).await;
    let (server, sip) = start_sip(ServerOptions::default(), secure).await;
    let tls_addr = sip.tls.expect("a TLS listener");
    let uri = format!("sip:NATM1@{tls_addr};transport=tls");
    let trust = format!("sip_cafile\t\t{}\n", certificate.cert_path.display());
    let call = echo_call_at(uri, SRTP_PHONE, trust).await;
    assert!(call.log.contains("SRTP is Enabled"), "{}", call.log);
    ends_cleanly(server).await;
}

/// With `--sip-caller-auth`, a new call must answer a digest challenge: a phone with the
/// account is answered after its second INVITE; without credentials, or with the wrong
/// password, a caller is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_must_prove_the_account_when_one_is_set() {
    use duplex::gateway::sip::auth::CallerAuth;
    let account = Some(std::sync::Arc::new(
        CallerAuth::parse("pbx:s3cret").unwrap(),
    ));
    let guarded = SipSettings {
        caller_auth: account,
        ..settings(sip::private_networks())
    };
    let (server, sip) = start_sip(ServerOptions::default(), guarded).await;
    let sip = sip.udp;
    echo_call(sip, AUTHENTICATED_PHONE, "").await;
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);

    let phone = RawPhone::new(sip).await;
    let offer = phone.offer("0");
    let challenged = phone
        .exchange(&phone.request("INVITE", None, "", &offer))
        .await;
    assert!(challenged.starts_with("SIP/2.0 401 "), "{challenged}");
    let challenge = header(&challenged, "WWW-Authenticate").unwrap();
    let nonce = digest_param(challenge, "nonce");
    let credentials = |password: &str| {
        let ha1 = md5_hex(&format!("pbx:duplex:{password}"));
        let ha2 = md5_hex(&format!("INVITE:sip:agent@{sip}"));
        let response = md5_hex(&format!("{ha1}:{nonce}:00000001:beef:auth:{ha2}"));
        format!(
            "Authorization: Digest username=\"pbx\", realm=\"duplex\", nonce=\"{nonce}\", \
uri=\"sip:agent@{sip}\", qop=auth, nc=00000001, cnonce=\"beef\", response=\"{response}\"\r\n"
        )
    };
    let wrong = phone
        .exchange(&phone.request("INVITE", None, &credentials("guess"), &offer))
        .await;
    assert!(wrong.starts_with("SIP/2.0 403 "), "{wrong}");
    assert!(
        header(&wrong, "Warning")
            .unwrap()
            .contains("wrong credentials")
    );
    assert_eq!(server.state.engine.active_sessions(), 0);
    let (answered, _) = phone.call_with(&credentials("s3cret"), &offer).await;
    assert!(answered.starts_with("SIP/2.0 200 "), "{answered}");
    assert_eq!(server.state.engine.active_sessions(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_g722_phone_hears_itself_in_wideband() {
    wideband_echo(G722_PHONE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opus_phone_hears_itself_in_wideband() {
    wideband_echo(OPUS_PHONE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sip_phone_is_answered_and_hears_itself_back() {
    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    let call = echo_call(sip, G711_PHONE, "").await;
    assert_eq!(call.rate, 8000);
    // baresip hangs up (BYE) when its file ends: the slot is freed at once.
    assert!(
        eventually(Duration::from_secs(3), || server
            .state
            .engine
            .active_sessions()
            == 0)
        .await
    );
    assert!(server.metrics.packets_received.get() > 200);
    assert_eq!(server.metrics.packets_bad.get(), 0);
    assert_eq!(
        server
            .metrics
            .calls_started
            .with_label_values(&["sip"])
            .get(),
        1
    );
    let lengths = server.metrics.call_seconds.with_label_values(&["sip"]);
    assert!(
        eventually(Duration::from_secs(1), || lengths.get_sample_count() == 1).await,
        "the ended call's length is observed"
    );
    assert!(
        (3.0..15.0).contains(&lengths.get_sample_sum()),
        "{}",
        lengths.get_sample_sum()
    );
    server.stop().await;
}

/// The PersonaPlex engine (tiny reference checkpoint) behind SIP, the voice named by the
/// request URI: the caller hears the model, resampled to 8 kHz and G.711.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_answers_a_sip_call() {
    let options = ServerOptions {
        engine: common::TestEngine::TinyPersonaPlex,
        max_sessions: 2,
        ..Default::default()
    };
    let (server, sip) = start(options, sip::private_networks()).await;
    let wav = speech_wav(G711_PHONE);
    let uri = format!("sip:NATM0@{sip}");
    let call = tokio::task::spawn_blocking(move || baresip_call(&uri, G711_PHONE, &wav, 12, ""))
        .await
        .unwrap();
    assert!(call.log.contains("Call established"), "{}", call.log);
    assert!(
        call.heard.len() > 8000 * 3,
        "{} samples heard",
        call.heard.len()
    );
    let level = duplex::audio::signal::rms(&call.heard);
    assert!(level > 1e-4, "the model's audio is not silent: rms {level}");
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    server.stop().await;
}

/// A SIP user agent written out by hand, for what a phone will not send on command.
struct RawPhone {
    socket: UdpSocket,
    /// Where its offers say its RTP goes.
    rtp: UdpSocket,
    server: SocketAddr,
    call_id: String,
    from_tag: String,
    /// The CSeq of its last request other than ACK (which repeats its INVITE's).
    cseq: std::sync::atomic::AtomicU32,
}

impl RawPhone {
    async fn new(server: SocketAddr) -> Self {
        Self {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            call_id: format!("{:x}@test", rand::random::<u64>()),
            from_tag: "raw1".into(),
            cseq: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn request(&self, method: &str, to_tag: Option<&str>, extra: &str, body: &str) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let cseq = match method {
            "ACK" => self.cseq.load(Relaxed),
            _ => self.cseq.fetch_add(1, Relaxed) + 1,
        };
        let local = self.socket.local_addr().unwrap();
        let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
        let content_type = match body.is_empty() {
            true => "",
            false => "Content-Type: application/sdp\r\n",
        };
        format!(
            "{method} sip:agent@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{branch:x}\r\n\
From: <sip:raw@{local}>;tag={from_tag}\r\nTo: <sip:agent@{server}>{to_tag}\r\nCall-ID: {call_id}\r\n\
CSeq: {cseq} {method}\r\nContact: <sip:raw@{local}>\r\nMax-Forwards: 70\r\n{extra}{content_type}\
Content-Length: {len}\r\n\r\n{body}",
            server = self.server,
            branch = rand::random::<u64>(),
            call_id = self.call_id,
            from_tag = self.from_tag,
            len = body.len(),
        )
    }

    async fn send(&self, text: &str) {
        self.socket
            .send_to(text.as_bytes(), self.server)
            .await
            .unwrap();
    }

    /// The next datagram within `limit` that is not a provisional response.
    async fn next(&self, limit: Duration) -> Option<String> {
        let mut buf = vec![0u8; 65536];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let received = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await;
            let (len, _) = received.ok()?.ok()?;
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            if !text.starts_with("SIP/2.0 1") {
                return Some(text);
            }
        }
    }

    async fn exchange(&self, text: &str) -> String {
        self.send(text).await;
        self.next(Duration::from_secs(3))
            .await
            .expect("a final response")
    }

    /// INVITEs with `offer`, ACKs the 200 and returns it with our dialog's To tag.
    async fn call(&self, offer: &str) -> (String, String) {
        self.call_with("", offer).await
    }

    /// The same, with `extra` headers on the INVITE.
    async fn call_with(&self, extra: &str, offer: &str) -> (String, String) {
        let answer = self
            .exchange(&self.request("INVITE", None, extra, offer))
            .await;
        assert!(answer.starts_with("SIP/2.0 200 "), "{answer}");
        let tag = to_tag(&answer);
        self.send(&self.request("ACK", Some(&tag), "", "")).await;
        (answer, tag)
    }

    fn offer(&self, media: &str) -> String {
        offer_at(self.rtp.local_addr().unwrap().port(), media)
    }
}

fn to_tag(response: &str) -> String {
    let to = header(response, "To").unwrap();
    to.split(";tag=").nth(1).unwrap().to_owned()
}

fn offer_at(port: u16, media: &str) -> String {
    format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio {port} RTP/AVP {media}\r\n"
    )
}

/// Where an SDP answer says its RTP goes.
fn rtp_address(answer: &str) -> SocketAddr {
    let ip = answer
        .lines()
        .find_map(|line| line.strip_prefix("c=IN IP4 "))
        .unwrap();
    let port = answer
        .lines()
        .find_map(|line| line.strip_prefix("m=audio "))
        .and_then(|rest| rest.split(' ').next())
        .unwrap();
    format!("{}:{port}", ip.trim()).parse().unwrap()
}

/// One PCMU packet of silence, written out by hand.
fn pcmu_packet(sequence: u16) -> Vec<u8> {
    let mut packet = vec![0x80, 0x00];
    packet.extend_from_slice(&sequence.to_be_bytes());
    packet.extend_from_slice(&(u32::from(sequence) * 160).to_be_bytes());
    packet.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    packet.extend_from_slice(&[0xff; 160]);
    packet
}

/// Whether `socket` receives an RTP packet within a second.
async fn hears_rtp(socket: &UdpSocket) -> bool {
    let mut buf = [0u8; 2048];
    let received = tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await;
    matches!(received, Ok(Ok((len, _))) if len == 12 + 160 && buf[0] == 0x80)
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_get_the_sip_answer_that_says_why() {
    let (server, sip) = start(
        ServerOptions {
            max_sessions: 1,
            ..Default::default()
        },
        sip::private_networks(),
    )
    .await;
    let phone = RawPhone::new(sip).await;
    let g729_only = phone.offer("18\r\na=rtpmap:18 G729/8000");
    let response = phone
        .exchange(&phone.request("INVITE", None, "", &g729_only))
        .await;
    assert!(response.starts_with("SIP/2.0 488 "), "{response}");
    let warning = header(&response, "Warning").unwrap();
    assert!(
        warning.contains("g729/8000") && warning.contains("opus, G722, PCMU, PCMA"),
        "{response}"
    );

    let pcmu = phone.offer("0");
    let unknown_voice = "X-Duplex-Voice: ../../etc/passwd\r\n";
    let response = phone
        .exchange(&phone.request("INVITE", None, unknown_voice, &pcmu))
        .await;
    assert!(response.starts_with("SIP/2.0 400 "), "{response}");
    assert!(
        header(&response, "Warning").unwrap().contains("NATF0"),
        "lists the voices: {response}"
    );

    let requires = "Require: 100rel\r\n";
    let response = phone
        .exchange(&phone.request("INVITE", None, requires, &pcmu))
        .await;
    assert!(response.starts_with("SIP/2.0 420 "), "{response}");
    assert_eq!(header(&response, "Unsupported"), Some("100rel"));

    let response = phone
        .exchange(&phone.request("BYE", Some("nope"), "", ""))
        .await;
    assert!(response.starts_with("SIP/2.0 481 "), "{response}");
    let response = phone
        .exchange(&phone.request("REGISTER", None, "", ""))
        .await;
    assert!(response.starts_with("SIP/2.0 405 "), "{response}");
    assert!(header(&response, "Allow").unwrap().contains("INVITE"));
    let response = phone
        .exchange(&phone.request("OPTIONS", None, "", ""))
        .await;
    assert!(response.starts_with("SIP/2.0 200 "), "{response}");

    // Garbage is dropped and counted; the endpoint goes on answering.
    phone.send("\u{1}\u{2} not sip at all").await;
    phone.send("INVITE sip:x SIP/2.0\r\nVia: x\r\n\r\n").await;
    assert_eq!(phone.next(Duration::from_millis(300)).await, None);

    // One slot: the second call gets 503 with Retry-After.
    let first = RawPhone::new(sip).await;
    first.call(&first.offer("0")).await;
    let second = RawPhone::new(sip).await;
    let response = second
        .exchange(&second.request("INVITE", None, "", &pcmu))
        .await;
    assert!(response.starts_with("SIP/2.0 503 "), "{response}");
    assert_eq!(header(&response, "Retry-After"), Some("5"));
    assert_eq!(server.state.engine.active_sessions(), 1);
    let rejected = |reason: &str| {
        server
            .metrics
            .sessions_rejected
            .with_label_values(&[reason])
            .get()
    };
    assert_eq!(
        (rejected("bad_sdp"), rejected("persona"), rejected("full")),
        (1, 1, 1)
    );
    server.stop().await;
}

/// SIP over a TCP stream, read message by message as the server frames it.
struct SipStream {
    stream: tokio::net::TcpStream,
    pending: Vec<u8>,
}

impl SipStream {
    async fn connect(server: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(server).await.unwrap();
        Self {
            stream,
            pending: Vec::new(),
        }
    }

    async fn write(&mut self, text: &str) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(text.as_bytes()).await.unwrap();
    }

    /// The next message (or a keep-alive's CRLF) within 3 s; None once the server closes
    /// (or resets) the connection.
    async fn read(&mut self) -> Option<String> {
        use duplex::gateway::sip::message::{Framed, frame};
        use tokio::io::AsyncReadExt;
        loop {
            if self.pending == b"\r\n" {
                // A pong (framing would wait for a second CRLF, as for a split ping).
                self.pending.clear();
                return Some("\r\n".into());
            }
            match frame(&self.pending) {
                Ok(Framed::Message(len) | Framed::Padding(len) | Framed::Ping(len)) => {
                    let bytes: Vec<u8> = self.pending.drain(..len).collect();
                    return Some(String::from_utf8(bytes).unwrap());
                }
                Ok(Framed::Partial) => {}
                Err(err) => panic!("the server's stream: {err}"),
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(3), self.stream.read(&mut chunk));
            // A close with our bytes still unread arrives as a reset.
            match read.await.expect("the server writes or closes") {
                Ok(0) => return None,
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(err) => panic!("reading the server's stream: {err}"),
            }
        }
    }

    /// The next message that is not a provisional response.
    async fn final_message(&mut self) -> String {
        loop {
            let text = self.read().await.expect("a message");
            if !text.starts_with("SIP/2.0 1") {
                return text;
            }
        }
    }
}

/// A raw phone's requests, over TCP.
fn over_tcp(request: &str) -> String {
    request.replacen("Via: SIP/2.0/UDP ", "Via: SIP/2.0/TCP ", 1)
}

/// An INVITE too big for a comfortable datagram comes over TCP, as RFC 3261 §18.1.1 sends
/// it: answered on its connection, with a Contact that keeps the call on TCP; the media
/// runs; at shutdown our BYE comes down the same connection. Keep-alives are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_invite_over_tcp_is_answered_on_its_connection() {
    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    let phone = RawPhone::new(sip).await;
    let mut stream = SipStream::connect(sip).await;
    stream.write("\r\n\r\n").await;
    assert_eq!(stream.read().await.as_deref(), Some("\r\n"), "a pong");
    let padding: String = (0..40)
        .map(|i| format!("\r\na=x-padding-{i}:{}", "x".repeat(40)))
        .collect();
    let offer = phone.offer(&format!("0{padding}"));
    let invite = over_tcp(&phone.request("INVITE", None, "", &offer));
    assert!(invite.len() > 1500, "{} bytes", invite.len());
    stream.write(&invite).await;
    let answer = stream.final_message().await;
    assert!(answer.starts_with("SIP/2.0 200 "), "{answer}");
    let contact = header(&answer, "Contact").unwrap();
    assert!(contact.ends_with(";transport=tcp>"), "{contact}");
    let tag = to_tag(&answer);
    stream
        .write(&over_tcp(&phone.request("ACK", Some(&tag), "", "")))
        .await;
    assert!(hears_rtp(&phone.rtp).await, "the agent's RTP comes");
    assert_eq!(server.state.engine.active_sessions(), 1);

    let stopping = tokio::spawn(server.stop());
    let bye = stream.final_message().await;
    assert!(bye.starts_with("BYE "), "{bye}");
    assert!(bye.contains("\r\nVia: SIP/2.0/TCP "), "{bye}");
    let ok = format!(
        "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {}\r\n\
Content-Length: 0\r\n\r\n",
        header(&bye, "Via").unwrap(),
        header(&bye, "From").unwrap(),
        header(&bye, "To").unwrap(),
        header(&bye, "Call-ID").unwrap(),
        header(&bye, "CSeq").unwrap(),
    );
    stream.write(&ok).await;
    stopping.await.unwrap();
}

/// A stream that cannot be SIP is closed; a stranger's INVITE over TCP gets its 403, then
/// the connection is closed; a stranger on the TLS port gets no handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_and_strangers_over_tcp_are_closed() {
    let (elsewhere, _) = with_tls(settings(vec!["10.0.0.0/8".parse().unwrap()])).await;
    let (server, addrs) = start_sip(ServerOptions::default(), elsewhere).await;
    let sip = addrs.udp;
    // A stranger on the TLS port is closed before any handshake.
    let mut stranger_tls = SipStream::connect(addrs.tls.unwrap()).await;
    assert_eq!(stranger_tls.read().await, None, "closed at once");
    let phone = RawPhone::new(sip).await;
    let mut stranger = SipStream::connect(sip).await;
    let invite = over_tcp(&phone.request("INVITE", None, "", &phone.offer("0")));
    stranger.write(&invite).await;
    let refused = stranger.final_message().await;
    assert!(refused.starts_with("SIP/2.0 403 "), "{refused}");
    assert_eq!(stranger.read().await, None, "closed after the answer");
    server.stop().await;

    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    let mut garbage = SipStream::connect(sip).await;
    garbage
        .write("OPTIONS sip:x SIP/2.0\r\nContent-Length: lots\r\n\r\n")
        .await;
    assert_eq!(garbage.read().await, None, "closed");
    let mut endless = SipStream::connect(sip).await;
    endless.write(&"x".repeat(20 * 1024)).await;
    assert_eq!(endless.read().await, None, "closed");
    assert_eq!(server.state.engine.active_sessions(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_outside_the_allowed_networks_are_forbidden() {
    let only_elsewhere = vec!["10.0.0.0/8".parse().unwrap()];
    let (server, sip) = start(ServerOptions::default(), only_elsewhere).await;
    let phone = RawPhone::new(sip).await;
    let response = phone
        .exchange(&phone.request("INVITE", None, "", &phone.offer("0")))
        .await;
    assert!(response.starts_with("SIP/2.0 403 "), "{response}");
    assert!(
        header(&response, "Warning")
            .unwrap()
            .contains("--sip-allow")
    );
    assert_eq!(server.state.engine.active_sessions(), 0);
    server.stop().await;
}

/// Over UDP the 200 OK is sent again until the caller ACKs it; when the server shuts down it
/// hangs up the call itself with a BYE in the caller's dialog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_is_resent_until_acked_and_shutdown_sends_a_bye() {
    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    let phone = RawPhone::new(sip).await;
    let answer = phone
        .exchange(&phone.request("INVITE", None, "", &phone.offer("8")))
        .await;
    assert!(answer.starts_with("SIP/2.0 200 "), "{answer}");
    assert!(answer.contains("a=rtpmap:8 PCMA/8000"), "{answer}");
    let tag = to_tag(&answer);
    let again = phone.next(Duration::from_secs(2)).await.unwrap();
    assert!(
        again.starts_with("SIP/2.0 200 "),
        "resent before the ACK: {again}"
    );
    phone.send(&phone.request("ACK", Some(&tag), "", "")).await;
    // Anything already in flight, then silence.
    let _ = phone.next(Duration::from_millis(200)).await;
    assert_eq!(phone.next(Duration::from_millis(1500)).await, None);

    let stopping = tokio::spawn(server.stop());
    let bye = phone.next(Duration::from_secs(3)).await.expect("a BYE");
    assert!(bye.starts_with("BYE sip:raw@"), "{bye}");
    assert_eq!(header(&bye, "Call-ID"), Some(phone.call_id.as_str()));
    assert!(header(&bye, "From").unwrap().contains(&tag), "{bye}");
    assert!(header(&bye, "To").unwrap().contains("tag=raw1"), "{bye}");
    stopping.await.unwrap();
}

/// The agent's RTP goes where the caller's comes from; a stranger's packets to the call's
/// port are refused, and a re-INVITE moves the media.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_follows_the_caller_and_a_reinvite_and_strangers_are_refused() {
    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    let phone = RawPhone::new(sip).await;
    let (answer, tag) = phone.call(&phone.offer("0")).await;
    let server_rtp = rtp_address(&answer);
    assert!(
        hears_rtp(&phone.rtp).await,
        "the agent's RTP reaches the offered port"
    );
    // From another address, even before the caller's first packet: refused.
    let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    stranger.send_to(&pcmu_packet(1), server_rtp).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    phone
        .rtp
        .send_to(&pcmu_packet(2), server_rtp)
        .await
        .unwrap();
    // From the caller's address but another port, once the caller's is known: refused.
    let neighbour = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for sequence in 3..7 {
        neighbour
            .send_to(&pcmu_packet(sequence), server_rtp)
            .await
            .unwrap();
    }
    let bad = || server.metrics.packets_bad.get();
    assert!(
        eventually(Duration::from_secs(2), || bad() == 5).await,
        "strangers' packets are refused: {} bad",
        bad()
    );
    assert_eq!(server.metrics.packets_received.get(), 1);
    let mut stolen = [0u8; 256];
    let heard = tokio::time::timeout(Duration::from_millis(200), stranger.recv_from(&mut stolen));
    assert!(heard.await.is_err(), "the stranger hears nothing");

    let rtp_b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let moved = offer_at(rtp_b.local_addr().unwrap().port(), "0");
    let reinvite = phone.request("INVITE", Some(&tag), "", &moved);
    let reanswer = phone.exchange(&reinvite).await;
    assert!(reanswer.starts_with("SIP/2.0 200 "), "{reanswer}");
    assert!(
        reanswer.contains(" 2 IN IP4 "),
        "the SDP version counts up: {reanswer}"
    );
    assert!(header(&reanswer, "Contact").is_some(), "{reanswer}");
    assert_eq!(rtp_address(&reanswer), server_rtp);
    // The same re-INVITE again (its answer lost): the same answer, not a third version.
    assert_eq!(phone.exchange(&reinvite).await, reanswer);
    assert!(
        hears_rtp(&rtp_b).await,
        "the agent's RTP moved with the re-INVITE"
    );
    let other_codec = phone.request("INVITE", Some(&tag), "", &offer_at(4000, "8"));
    let refused = phone.exchange(&other_codec).await;
    assert!(
        refused.starts_with("SIP/2.0 488 "),
        "a codec change is refused: {refused}"
    );
    assert!(hears_rtp(&rtp_b).await, "and the call goes on as it was");
    // A re-INVITE without SDP (a PBX taking the call off hold): our offer in the 200, the
    // caller's answer in the ACK moves the media.
    let reoffer = phone
        .exchange(&phone.request("INVITE", Some(&tag), "", ""))
        .await;
    assert!(reoffer.starts_with("SIP/2.0 200 "), "{reoffer}");
    assert!(
        reoffer.contains("m=audio ") && reoffer.contains("a=sendrecv"),
        "{reoffer}"
    );
    let rtp_c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answer_c = offer_at(rtp_c.local_addr().unwrap().port(), "0");
    phone
        .send(&phone.request("ACK", Some(&tag), "", &answer_c))
        .await;
    assert!(hears_rtp(&rtp_c).await, "the ACK's answer moved the media");
    let bye = phone
        .exchange(&phone.request("BYE", Some(&tag), "", ""))
        .await;
    assert!(bye.starts_with("SIP/2.0 200 "), "{bye}");
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    server.stop().await;
}

/// An INVITE without SDP (a late offer, as some PBXs send by default) gets our offer in the
/// 200, and the ACK's answer starts the media; an ACK without one ends the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_offer_is_answered_in_the_ack() {
    let (server, sip) = start(ServerOptions::default(), sip::private_networks()).await;
    let phone = RawPhone::new(sip).await;
    let ours = phone.exchange(&phone.request("INVITE", None, "", "")).await;
    assert!(ours.starts_with("SIP/2.0 200 "), "{ours}");
    assert!(
        ours.contains("m=audio ") && ours.contains(" RTP/AVP 111 9 0 8 101 110\r\n"),
        "{ours}"
    );
    let tag = to_tag(&ours);
    let answer = phone.offer("8");
    phone
        .send(&phone.request("ACK", Some(&tag), "", &answer))
        .await;
    let mut buf = [0u8; 2048];
    let received = tokio::time::timeout(Duration::from_secs(1), phone.rtp.recv_from(&mut buf));
    let (len, _) = received.await.expect("the agent's RTP").unwrap();
    assert_eq!(
        (len, buf[1] & 0x7f),
        (12 + 160, 8),
        "PCMA, as the ACK answered"
    );

    let silent = RawPhone::new(sip).await;
    let ours = silent
        .exchange(&silent.request("INVITE", None, "", ""))
        .await;
    let tag = to_tag(&ours);
    silent
        .send(&silent.request("ACK", Some(&tag), "", ""))
        .await;
    let bye = silent.next(Duration::from_secs(3)).await.expect("a BYE");
    assert!(bye.starts_with("BYE "), "{bye}");
    assert!(
        server.sessions_become(1, Duration::from_secs(3)).await,
        "the unanswered call's slot is freed"
    );
    server.stop().await;
}

/// A request within a call must carry its tags; one from outside `--sip-allow` gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_caller_can_end_its_call() {
    let only_loopback_one = vec!["127.0.0.1/32".parse().unwrap()];
    let (server, sip) = start(ServerOptions::default(), only_loopback_one).await;
    let phone = RawPhone::new(sip).await;
    let (_, tag) = phone.call(&phone.offer("0")).await;
    // Another caller reusing this call's Call-ID opens nothing and takes nothing.
    let mut intruder = RawPhone::new(sip).await;
    intruder.call_id = phone.call_id.clone();
    intruder.from_tag = "intruder".into();
    let taken = intruder
        .exchange(&intruder.request("INVITE", None, "", &intruder.offer("0")))
        .await;
    assert!(taken.starts_with("SIP/2.0 400 "), "{taken}");
    assert_eq!(server.state.engine.active_sessions(), 1);
    let wrong_tag = phone
        .exchange(&phone.request("BYE", Some("guess"), "", ""))
        .await;
    assert!(wrong_tag.starts_with("SIP/2.0 481 "), "{wrong_tag}");
    let outsider = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let bye = phone.request("BYE", Some(&tag), "", "");
    outsider.send_to(bye.as_bytes(), sip).await.unwrap();
    let mut buf = [0u8; 2048];
    let answered = tokio::time::timeout(Duration::from_millis(500), outsider.recv_from(&mut buf));
    assert!(answered.await.is_err(), "an outsider gets no answer");
    assert_eq!(server.state.engine.active_sessions(), 1, "the call goes on");
    let forbidden = &server.metrics.transport_events;
    assert_eq!(forbidden.with_label_values(&["sip", "forbidden"]).get(), 1);
    let own = phone.exchange(&bye).await;
    assert!(own.starts_with("SIP/2.0 200 "), "{own}");
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    server.stop().await;
}

fn md5_hex(text: &str) -> String {
    Md5::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A digest parameter of an Authorization header.
fn digest_param<'a>(header: &'a str, key: &str) -> &'a str {
    header
        .split(", ")
        .find_map(|p| {
            p.trim_start_matches("Digest ")
                .strip_prefix(&format!("{key}="))
        })
        .unwrap_or_else(|| panic!("{key} in {header}"))
        .trim_matches('"')
}

/// A PBX's registrar, written out by hand: it challenges the first REGISTER, checks the
/// digest of the second (computed here from the password, RFC 2617 with qop=auth), grants
/// two seconds, sees the registration refreshed, then calls the extension at its Contact.
/// Checks a digest answer (`qop=auth`) to the test PBX's challenge (realm `pbx`, nonce
/// `n0nce`) with extension 7000's password, over `method_uri` (`INVITE:sip:…`).
fn assert_digest(authorization: &str, method_uri: &str, message: &str) {
    let (nc, cnonce) = (
        digest_param(authorization, "nc"),
        digest_param(authorization, "cnonce"),
    );
    let ha1 = md5_hex("7000:pbx:s3cret");
    let ha2 = md5_hex(method_uri);
    let expected = md5_hex(&format!("{ha1}:n0nce:{nc}:{cnonce}:auth:{ha2}"));
    assert_eq!(
        digest_param(authorization, "response"),
        expected,
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_registers_as_an_extension_and_takes_its_calls() {
    let registrar = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = registrar.local_addr().unwrap();
    let settings =
        RegisterSettings::parse(&format!("sip:7000@{at}"), "s3cret".into(), None).unwrap();
    // Only the registrar's own address may call, and it is added by the registration.
    let nobody = vec!["192.0.2.0/24".parse().unwrap()];
    let registering = SipSettings {
        register: Some(settings),
        ..self::settings(nobody)
    };
    let (server, sip) = start_sip(ServerOptions::default(), registering).await;
    let sip = sip.udp;
    let mut buf = vec![0u8; 65536];
    let mut receive = async || {
        let received = tokio::time::timeout(Duration::from_secs(5), registrar.recv_from(&mut buf));
        let (len, from) = received.await.expect("a REGISTER").unwrap();
        (String::from_utf8_lossy(&buf[..len]).into_owned(), from)
    };
    let (first, from) = receive().await;
    assert!(
        first.starts_with(&format!("REGISTER sip:{at} SIP/2.0")),
        "{first}"
    );
    assert_eq!(from, sip);
    let reply = |request: &str, status: &str, extra: &str| {
        let copied: String = request
            .lines()
            .filter(|l| {
                ["Via:", "From:", "To:", "Call-ID:", "CSeq:"]
                    .iter()
                    .any(|h| l.starts_with(h))
            })
            .map(|l| format!("{l}\r\n"))
            .collect();
        format!("SIP/2.0 {status}\r\n{copied}{extra}Content-Length: 0\r\n\r\n")
    };
    let challenge = "WWW-Authenticate: Digest realm=\"pbx\", nonce=\"n0nce\", qop=\"auth\"\r\n";
    registrar
        .send_to(
            reply(&first, "401 Unauthorized", challenge).as_bytes(),
            from,
        )
        .await
        .unwrap();
    // Past any retransmission of the first, to the one answering the challenge.
    let second = loop {
        let (request, _) = receive().await;
        if header(&request, "Authorization").is_some() {
            break request;
        }
    };
    let authorization = header(&second, "Authorization").unwrap();
    assert_digest(authorization, &format!("REGISTER:sip:{at}"), &second);
    registrar
        .send_to(reply(&second, "200 OK", "Expires: 2\r\n").as_bytes(), from)
        .await
        .unwrap();
    let registered = &server.metrics.sip_registered;
    assert!(eventually(Duration::from_secs(2), || registered.get() == 1).await);
    let (refresh, _) = receive().await;
    let cseq = |request: &str| header(request, "CSeq").unwrap().to_owned();
    assert_ne!(
        cseq(&refresh),
        cseq(&second),
        "a new REGISTER, not a retransmission"
    );
    assert!(
        refresh.starts_with("REGISTER "),
        "refreshed before it expired: {refresh}"
    );
    let contact = header(&refresh, "Contact").unwrap();
    assert!(
        contact.contains(&format!("@{sip}>")),
        "calls come to our SIP port: {contact}"
    );

    // The PBX calls the extension from the registrar's address.
    let rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let invite = format!(
        "INVITE sip:7000@{sip} SIP/2.0\r\nVia: SIP/2.0/UDP {at};branch=z9hG4bKpbx1\r\n\
From: <sip:100@{at}>;tag=pbx\r\nTo: <sip:7000@{sip}>\r\nCall-ID: pbx-call-1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:pbx@{at}>\r\nContent-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{sdp}",
        len = offer_at(rtp.local_addr().unwrap().port(), "0").len(),
        sdp = offer_at(rtp.local_addr().unwrap().port(), "0"),
    );
    registrar.send_to(invite.as_bytes(), sip).await.unwrap();
    let answered = loop {
        let (text, _) = receive().await;
        if text.starts_with("SIP/2.0 200 ") {
            break text;
        }
    };
    assert!(answered.contains("CSeq: 1 INVITE"), "{answered}");
    assert_eq!(server.state.engine.active_sessions(), 1);

    // At shutdown the call gets our BYE and the registration is withdrawn, so the PBX stops
    // sending calls here.
    let metrics = server.metrics.clone();
    let stopping = tokio::spawn(server.stop());
    let (mut bye, mut withdrawn) = (false, false);
    while !(bye && withdrawn) {
        let (request, _) = receive().await;
        if request.starts_with("BYE ") {
            bye = true;
            let ok = reply(&request, "200 OK", "");
            registrar.send_to(ok.as_bytes(), sip).await.unwrap();
        } else if request.starts_with("REGISTER ") && header(&request, "Expires") == Some("0") {
            withdrawn = true;
            let ok = reply(&request, "200 OK", "");
            registrar.send_to(ok.as_bytes(), sip).await.unwrap();
        }
    }
    let took = stopping.await.unwrap();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    assert_eq!(metrics.sip_registered.get(), 0);
}

#[test]
fn a_bad_sip_allow_network_or_codec_is_refused_by_name() {
    let refused = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args(["serve", "--engine", "echo", "--sip-port", "5060"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let network = refused(&["--sip-allow", "10.0.0.0/8,nonsense"]);
    assert!(
        network.contains("\"nonsense\" is neither a network"),
        "{network}"
    );
    let codec = refused(&["--sip-codecs", "g722,G729"]);
    assert!(codec.contains("unknown codec \"G729\""), "{codec}");
    let account = refused(&["--sip-caller-auth", "nopassword"]);
    assert!(
        account.contains("--sip-caller-auth: expected USER:PASSWORD"),
        "{account}"
    );
    let no_certificate = refused(&["--sip-tls-port", "5061"]);
    assert!(
        no_certificate.contains("--sip-tls-port needs a certificate"),
        "{no_certificate}"
    );
}

#[test]
fn a_bad_registration_is_refused_before_serving() {
    let serve = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args([
                "serve",
                "--engine",
                "echo",
                "--port",
                "0",
                "--sip-port",
                "0",
            ])
            .args(args)
            .env_remove("DUPLEX_SIP_PASSWORD")
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let no_password = serve(&["--sip-register", "sip:7000@127.0.0.1"]);
    assert!(no_password.contains("--sip-password"), "{no_password}");
    let bad_uri = serve(&["--sip-register", "7000@pbx", "--sip-password", "x"]);
    assert!(
        bad_uri.contains("--sip-register: \"7000@pbx\" is not a sip: URI"),
        "{bad_uri}"
    );
    let tls = serve(&[
        "--sip-register",
        "sips:7000@127.0.0.1",
        "--sip-password",
        "x",
    ]);
    assert!(tls.contains("needs --sip-tls-port"), "{tls}");
    let ca = serve(&["--sip-tls-ca", "/nonexistent/ca.pem"]);
    assert!(ca.contains("--sip-tls-ca: /nonexistent/ca.pem"), "{ca}");
}

#[test]
fn serve_says_where_it_answers_sip() {
    let certificates = common::scratch_dir("sip-serve-tls");
    let args = [
        "--sip-port",
        "0",
        "--sip-allow",
        "192.0.2.0/24",
        "--sip-codecs",
        "g722,pcmu",
        "--sip-tls-port",
        "0",
        "--tls-self-signed",
        "--tls-dir",
        certificates.to_str().unwrap(),
        "--sip-caller-auth",
        "pbx:s3cret",
    ];
    let line = common::serve_until_logged(&args, "answering SIP calls", Duration::from_secs(20))
        .expect("a line saying SIP is answered");
    assert!(line.contains(" and tcp, tls 127.0.0.1:"), "{line}");
    assert!(line.contains(" (G722, PCMU over RTP)"), "{line}");
    assert!(line.contains("udp 127.0.0.1:"), "{line}");
    assert!(
        !line.contains("udp 127.0.0.1:0 "),
        "the port taken, not 0: {line}"
    );
    assert!(
        line.contains("from 192.0.2.0/24 with the --sip-caller-auth password"),
        "{line}"
    );
    assert!(!line.contains("s3cret"), "{line}");
}

/// `POST /api/calls` on the test server.
async fn place_call(server: &TestServer, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/api/calls", server.base_url))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The report of a placed call.
async fn call_report(server: &TestServer, id: &str) -> serde_json::Value {
    let url = format!("{}/api/calls/{id}", server.base_url);
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// `DELETE /api/calls/{id}`: hangs the call up.
async fn delete_call(server: &TestServer, id: &str) -> reqwest::Response {
    let url = format!("{}/api/calls/{id}", server.base_url);
    reqwest::Client::new().delete(url).send().await.unwrap()
}

/// Places a call to `to` and returns its id, checking the 201 and its Location.
async fn dial(server: &TestServer, body: serde_json::Value) -> String {
    let response = place_call(server, body).await;
    let status = response.status();
    if status != 201 {
        panic!("{status}: {}", response.text().await.unwrap());
    }
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let report: serde_json::Value = response.json().await.unwrap();
    let id = report["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/calls/{id}"));
    assert_eq!(report["state"], "calling");
    id
}

/// Waits until the call's report is in `state`; the report.
async fn report_becomes(server: &TestServer, id: &str, state: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let report = call_report(server, id).await;
        if report["state"] == state || tokio::time::Instant::now() > deadline {
            assert_eq!(report["state"], state, "{report}");
            return report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A loopback port free for both UDP and TCP, and the port after it for TLS (baresip's
/// listening ports), as far as binding and letting go can tell.
fn free_phone_port() -> SocketAddr {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let next = SocketAddr::new(addr.ip(), addr.port().wrapping_add(1));
        if std::net::TcpListener::bind(addr).is_ok() && std::net::TcpListener::bind(next).is_ok() {
            return addr;
        }
    }
}

/// Waits (up to 5 s) until something accepts connections at `addr`: baresip, started.
async fn listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "baresip listens on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent calls baresip, answering as `phone` at `listen`, at `uri`: the call is answered
/// in `codec` and the phone hears its own speech echoed. The report once the phone hung up.
async fn placed_echo_call(
    server: &TestServer,
    (listen, uri): (SocketAddr, String),
    phone: Phone,
    codec: &str,
    config: String,
) -> serde_json::Value {
    let srtp = phone.account.contains("srtp");
    let wav = speech_wav(phone);
    let phone =
        tokio::task::spawn_blocking(move || baresip_answering(listen, phone, &wav, 10, &config));
    // Over TCP and TLS the INVITE needs the phone listening already (UDP sends it again).
    listening(listen).await;
    let body = serde_json::json!({"to": uri, "voice": "NATM1", "srtp": srtp});
    let id = dial(server, body).await;
    let report = report_becomes(server, &id, "answered").await;
    assert_eq!(report["codec"], codec, "{report}");
    assert_eq!(report["to"], uri);
    let transport = match uri.as_str() {
        uri if uri.starts_with("sips:") => "tls",
        uri if uri.ends_with(";transport=tcp") => "tcp",
        _ => "udp",
    };
    assert_eq!(report["transport"], transport);
    assert_eq!(server.state.engine.active_sessions(), 1);
    let call = phone.await.unwrap();
    assert!(call.log.contains("Call established"), "{}", call.log);
    if srtp {
        assert!(call.log.contains("SRTP is Enabled"), "{}", call.log);
    }
    let (correlation, lag_ms) = common::echo_correlation(&call.sent, &call.heard, call.rate);
    eprintln!(
        "echo of a call placed to {uri} ({codec}): correlation {correlation:.3} at {lag_ms:.0} ms"
    );
    assert!(correlation > 0.6, "correlation {correlation}");
    report_becomes(server, &id, "ended").await
}

/// The agent calls a real SIP phone (baresip, answering by itself): the call is answered in
/// G.722, the phone hears its own speech echoed, and its hang-up ends the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_calls_a_sip_phone_which_hears_itself() {
    let (server, _) = start(ServerOptions::default(), sip::private_networks()).await;
    let listen = free_phone_port();
    let to = (listen, format!("sip:tester@{listen}"));
    let report = placed_echo_call(&server, to, G722_PHONE, "G722", String::new()).await;
    let id = report["id"].as_str().unwrap();
    assert_eq!(report["reason"], "the other side hung up", "{report}");
    assert!(report["talked_s"].as_f64().unwrap() > 3.0, "{report}");
    // The echo engine's text: what it heard of the phone's speech.
    let agent_text = report["agent_text"].as_str().unwrap();
    assert!(agent_text.starts_with("[echo: "), "{report}");
    let listed: serde_json::Value = reqwest::get(format!("{}/api/calls", server.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["calls"][0]["id"], id);
    ends_cleanly(server).await;
}

/// A SIP user agent on the far side of a placed call, written out by hand.
struct RawCallee {
    socket: UdpSocket,
    rtp: UdpSocket,
    /// Where the server's SIP comes from.
    server: Option<SocketAddr>,
}

impl RawCallee {
    async fn new() -> Self {
        Self {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server: None,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// The next request within 5 s (a retransmission too).
    async fn request(&mut self) -> String {
        let mut buf = vec![0u8; 65536];
        let received =
            tokio::time::timeout(Duration::from_secs(5), self.socket.recv_from(&mut buf));
        let (len, from) = received.await.expect("a request").unwrap();
        self.server = Some(from);
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }

    /// The next request of `method`, past retransmissions of others.
    async fn expect(&mut self, method: &str) -> String {
        loop {
            let request = self.request().await;
            if request.starts_with(&format!("{method} ")) {
                return request;
            }
        }
    }

    /// Whether no request comes within `limit`.
    async fn silent_for(&self, limit: Duration) -> bool {
        let mut buf = vec![0u8; 65536];
        tokio::time::timeout(limit, self.socket.recv_from(&mut buf))
            .await
            .is_err()
    }

    /// Answers `request` with `status`, our tag `callee` on To, `extra` headers and `sdp`.
    async fn reply(&self, request: &str, status: &str, extra: &str, sdp: &str) {
        let text = response_to(request, status, "callee", extra, sdp);
        let server = self.server.unwrap();
        self.socket.send_to(text.as_bytes(), server).await.unwrap();
    }

    /// The 200 OK that answers `invite` with PCMU at our RTP socket.
    async fn answer(&self, invite: &str) {
        let contact = format!("Contact: <sip:bob@{}>\r\n", self.addr());
        let sdp = offer_at(self.rtp.local_addr().unwrap().port(), "0");
        self.reply(invite, "200 OK", &contact, &sdp).await;
    }

    /// A BYE from our side of the call `invite` set up.
    async fn hang_up(&self, invite: &str) {
        let from = header(invite, "From").unwrap();
        let text = format!(
            "BYE sip:duplex@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKbye1\r\n\
From: {to};tag=callee\r\nTo: {from}\r\nCall-ID: {call_id}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
            server = self.server.unwrap(),
            me = self.addr(),
            to = header(invite, "To").unwrap(),
            call_id = header(invite, "Call-ID").unwrap(),
        );
        let server = self.server.unwrap();
        self.socket.send_to(text.as_bytes(), server).await.unwrap();
    }
}

fn branch(message: &str) -> String {
    let via = header(message, "Via").unwrap();
    via.split(";branch=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// A callee that is busy fails the call with its status (its 486 ACKed in its transaction);
/// one that rings is cancelled when the call is hung up or rings too long; one that answers
/// gets its 2xx ACKed again when it sends it again, and a BYE when the call is hung up. The
/// callee's address is outside `--sip-allow`: its answers are read because the call went
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_calls_ring_fail_are_cancelled_and_hung_up() {
    let nobody = vec!["192.0.2.0/24".parse().unwrap()];
    let (server, _) = start(ServerOptions::default(), nobody).await;
    let mut callee = RawCallee::new().await;
    let to = format!("sip:bob@{}", callee.addr());

    // Busy.
    let id = dial(&server, serde_json::json!({"to": to})).await;
    let invite = callee.expect("INVITE").await;
    assert!(
        invite.starts_with(&format!("INVITE {to} SIP/2.0\r\n")),
        "{invite}"
    );
    assert!(invite.contains("\r\nm=audio "), "our offer: {invite}");
    assert!(
        header(&invite, "Contact")
            .unwrap()
            .starts_with("<sip:duplex@127.0.0.1:")
    );
    callee.reply(&invite, "100 Trying", "", "").await;
    callee.reply(&invite, "486 Busy Here", "", "").await;
    let ack = callee.expect("ACK").await;
    assert_eq!(
        branch(&ack),
        branch(&invite),
        "the ACK of a refusal is in its transaction"
    );
    assert!(
        header(&ack, "To").unwrap().ends_with(";tag=callee"),
        "{ack}"
    );
    let report = report_becomes(&server, &id, "failed").await;
    assert_eq!(
        (report["status"].as_u64(), report["reason"].as_str()),
        (Some(486), Some("486 Busy Here"))
    );
    // The callee's address reaches nothing else through the call: an INVITE with its
    // Call-ID is a stranger's (403), and so is a BYE that does not name our tag.
    let replayed = invite.replacen(&to, "sip:agent@127.0.0.1", 1);
    let server_sip = callee.server.unwrap();
    callee
        .socket
        .send_to(replayed.as_bytes(), server_sip)
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let (len, _) = tokio::time::timeout(Duration::from_secs(2), callee.socket.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let refusal = String::from_utf8_lossy(&buf[..len]).into_owned();
    assert!(refusal.starts_with("SIP/2.0 403 "), "{refusal}");
    assert_eq!(server.state.engine.active_sessions(), 0);

    // Ringing, then hung up: CANCEL, and the INVITE's 487 ACKed.
    let id = dial(&server, serde_json::json!({"to": to})).await;
    let invite = callee.expect("INVITE").await;
    callee.reply(&invite, "180 Ringing", "", "").await;
    report_becomes(&server, &id, "ringing").await;
    let hung_up = delete_call(&server, &id).await;
    assert_eq!(hung_up.status(), 200);
    let cancel = callee.expect("CANCEL").await;
    assert_eq!(branch(&cancel), branch(&invite));
    assert_eq!(
        header(&cancel, "CSeq"),
        Some(
            header(&invite, "CSeq")
                .unwrap()
                .replace("INVITE", "CANCEL")
                .as_str()
        )
    );
    callee.reply(&cancel, "200 OK", "", "").await;
    callee
        .reply(&invite, "487 Request Terminated", "", "")
        .await;
    callee.expect("ACK").await;
    let report = report_becomes(&server, &id, "failed").await;
    assert_eq!(report["status"], 487);
    assert_eq!(report["reason"], "hung up before it was answered");

    // Ringing too long.
    let body = serde_json::json!({"to": to, "ring_timeout_s": 1});
    let id = dial(&server, body).await;
    let invite = callee.expect("INVITE").await;
    callee.reply(&invite, "180 Ringing", "", "").await;
    let cancel = callee.expect("CANCEL").await;
    callee.reply(&cancel, "200 OK", "", "").await;
    callee
        .reply(&invite, "487 Request Terminated", "", "")
        .await;
    callee.expect("ACK").await;
    let report = report_becomes(&server, &id, "failed").await;
    assert_eq!(report["reason"], "no answer within 1 s");

    // Answered: ACKed (again for a resent 200), media both ways, then hung up with a BYE.
    let id = dial(&server, serde_json::json!({"to": to, "voice": "NATF1"})).await;
    let invite = callee.expect("INVITE").await;
    callee.answer(&invite).await;
    let ack = callee.expect("ACK").await;
    assert!(
        ack.starts_with(&format!("ACK sip:bob@{} SIP/2.0", callee.addr())),
        "to the Contact: {ack}"
    );
    assert_ne!(
        branch(&ack),
        branch(&invite),
        "the ACK of a 2xx is a transaction of its own"
    );
    let report = report_becomes(&server, &id, "answered").await;
    assert_eq!(report["codec"], "PCMU");
    callee.answer(&invite).await;
    let again = callee.expect("ACK").await;
    assert_eq!(header(&again, "CSeq"), header(&ack, "CSeq"));
    let our_rtp = rtp_address(&invite);
    for sequence in 0..10 {
        callee
            .rtp
            .send_to(&pcmu_packet(sequence), our_rtp)
            .await
            .unwrap();
    }
    assert!(
        hears_rtp(&callee.rtp).await,
        "the agent's RTP reaches the callee"
    );
    let hung_up = delete_call(&server, &id).await;
    assert_eq!(hung_up.status(), 200);
    let bye = callee.expect("BYE").await;
    assert!(
        bye.starts_with(&format!("BYE sip:bob@{} SIP/2.0", callee.addr())),
        "{bye}"
    );
    assert!(header(&bye, "To").unwrap().ends_with(";tag=callee"));
    assert_eq!(header(&bye, "From"), header(&invite, "From"));
    let invite_cseq: u32 = header(&invite, "CSeq")
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        header(&bye, "CSeq"),
        Some(format!("{} BYE", invite_cseq + 1).as_str())
    );
    callee.reply(&bye, "200 OK", "", "").await;
    let report = report_becomes(&server, &id, "ended").await;
    assert_eq!(report["reason"], "hung up by request");
    assert!(
        callee.silent_for(Duration::from_millis(700)).await,
        "one BYE, answered"
    );
    ends_cleanly(server).await;
}

/// A number goes to the `--sip-register` PBX, whose challenge is answered with the
/// extension's credentials (a digest over INVITE and the request URI); the callee's BYE
/// ends the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_is_called_through_the_pbx_with_its_credentials() {
    let mut pbx = RawCallee::new().await;
    let at = pbx.addr();
    let settings =
        RegisterSettings::parse(&format!("sip:7000@{at}"), "s3cret".into(), None).unwrap();
    let registering = SipSettings {
        register: Some(settings),
        ..self::settings(vec!["192.0.2.0/24".parse().unwrap()])
    };
    let (server, _) = start_sip(ServerOptions::default(), registering).await;
    let register = pbx.expect("REGISTER").await;
    pbx.reply(&register, "200 OK", "Expires: 300\r\n", "").await;

    let id = dial(&server, serde_json::json!({"to": "+15550100"})).await;
    let invite = pbx.expect("INVITE").await;
    let uri = format!("sip:+15550100@{at}");
    assert!(
        invite.starts_with(&format!("INVITE {uri} SIP/2.0\r\n")),
        "{invite}"
    );
    assert!(
        header(&invite, "From")
            .unwrap()
            .starts_with(&format!("<sip:7000@{at}>;tag="))
    );
    let challenge = "Proxy-Authenticate: Digest realm=\"pbx\", nonce=\"n0nce\", qop=\"auth\"\r\n";
    pbx.reply(&invite, "407 Proxy Authentication Required", challenge, "")
        .await;
    pbx.expect("ACK").await;
    let invite = pbx.expect("INVITE").await;
    let authorization = header(&invite, "Proxy-Authorization").expect("credentials");
    assert_digest(authorization, &format!("INVITE:{uri}"), &invite);
    assert!(
        header(&invite, "CSeq").unwrap().starts_with("2 "),
        "{invite}"
    );
    pbx.answer(&invite).await;
    pbx.expect("ACK").await;
    report_becomes(&server, &id, "answered").await;

    pbx.hang_up(&invite).await;
    let ok = loop {
        let mut buf = vec![0u8; 65536];
        let (len, _) = tokio::time::timeout(Duration::from_secs(3), pbx.socket.recv_from(&mut buf))
            .await
            .expect("the BYE answered")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        if text.starts_with("SIP/2.0 ") {
            break text;
        }
    };
    assert!(ok.starts_with("SIP/2.0 200 "), "{ok}");
    let report = report_becomes(&server, &id, "ended").await;
    assert_eq!(report["reason"], "the other side hung up");
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);

    // A call that outlasts its max_duration_s is hung up by the agent.
    let body = serde_json::json!({"to": "8002", "max_duration_s": 1});
    let id = dial(&server, body).await;
    let invite = pbx.expect("INVITE").await;
    pbx.answer(&invite).await;
    pbx.expect("ACK").await;
    report_becomes(&server, &id, "answered").await;
    let bye = pbx.expect("BYE").await;
    pbx.reply(&bye, "200 OK", "", "").await;
    let report = report_becomes(&server, &id, "ended").await;
    assert_eq!(report["reason"], "it lasted max_duration_s (1 s)");
    let talked = report["talked_s"].as_f64().unwrap();
    assert!((0.9..2.0).contains(&talked), "{report}");
}

/// A call given up before anything answered its INVITE fails at once; if the callee then
/// rings, it gets the CANCEL, and if it answers, an ACK and a BYE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_before_it_rang_is_cancelled_or_hung_up_when_it_does() {
    let (server, _) = start(ServerOptions::default(), sip::private_networks()).await;
    let mut callee = RawCallee::new().await;
    let to = format!("sip:bob@{}", callee.addr());

    let id = dial(&server, serde_json::json!({"to": to})).await;
    let invite = callee.expect("INVITE").await;
    assert_eq!(delete_call(&server, &id).await.status(), 200);
    let report = report_becomes(&server, &id, "failed").await;
    assert_eq!(report["reason"], "hung up before it was answered");
    callee.reply(&invite, "180 Ringing", "", "").await;
    let cancel = callee.expect("CANCEL").await;
    assert_eq!(branch(&cancel), branch(&invite));

    let id = dial(&server, serde_json::json!({"to": to})).await;
    let invite = callee.expect("INVITE").await;
    delete_call(&server, &id).await;
    report_becomes(&server, &id, "failed").await;
    callee.answer(&invite).await;
    let ack = callee.expect("ACK").await;
    let bye = callee.expect("BYE").await;
    assert_eq!(header(&bye, "Call-ID"), header(&ack, "Call-ID"));
    callee.reply(&bye, "200 OK", "", "").await;
    assert_eq!(server.state.engine.active_sessions(), 0);
    server.stop().await;
}

/// Requests that cannot become a call are refused before any INVITE, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_be_placed_is_refused_with_the_reason() {
    let without_sip = TestServer::start(ServerOptions::default()).await;
    let response = place_call(&without_sip, serde_json::json!({"to": "sip:a@127.0.0.1"})).await;
    assert_eq!(response.status(), 501);
    assert!(response.text().await.unwrap().contains("--sip-port"));
    without_sip.stop().await;

    let options = ServerOptions {
        max_sessions: 1,
        ..ServerOptions::default()
    };
    let (server, _) = start(options, sip::private_networks()).await;
    let cases = [
        (serde_json::json!({"to": "8001"}), 400, "--sip-register"),
        (
            serde_json::json!({"to": "sip:a@h\r\nX: 1"}),
            400,
            "no SIP URI has",
        ),
        (
            serde_json::json!({"to": "sip:a@127.0.0.1;transport=sctp"}),
            400,
            "udp, tcp or tls",
        ),
        (
            serde_json::json!({"to": "sip:a@127.0.0.1:1;transport=tcp"}),
            400,
            "cannot call",
        ),
        (
            serde_json::json!({"to": "sip:a@127.0.0.1", "voice": "NOBODY"}),
            400,
            "NOBODY",
        ),
        (
            serde_json::json!({"to": "sip:a@127.0.0.1", "ring_timeout_s": 0}),
            400,
            "ring_timeout_s",
        ),
        (
            serde_json::json!({"to": "sip:a@127.0.0.1", "max_duration_s": 100_000}),
            400,
            "max_duration_s",
        ),
        (
            serde_json::json!({"to": "sip:a@127.0.0.1", "status_url": "file:///etc/passwd"}),
            400,
            "status_url",
        ),
        (
            serde_json::json!({"to": "sip:a@127.0.0.1", "colour": "red"}),
            400,
            "colour",
        ),
        (
            serde_json::json!({"to": "sip:a@no-such-host.invalid"}),
            400,
            "cannot call",
        ),
    ];
    for (body, status, why) in cases {
        let response = place_call(&server, body.clone()).await;
        assert_eq!(response.status(), status, "{body}");
        let text = response.text().await.unwrap();
        assert!(text.contains(why), "{body}: {text}");
    }
    let form = reqwest::Client::new()
        .post(format!("{}/api/calls", server.base_url))
        .header("content-type", "text/plain")
        .body(r#"{"to": "sip:a@127.0.0.1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        form.status(),
        415,
        "a page cannot post a call without asking first"
    );
    let missing = reqwest::get(format!("{}/api/calls/nope", server.base_url))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // One slot: a call still ringing holds it.
    let mut callee = RawCallee::new().await;
    let to = format!("sip:bob@{}", callee.addr());
    let id = dial(&server, serde_json::json!({"to": to})).await;
    callee.expect("INVITE").await;
    let full = place_call(&server, serde_json::json!({"to": to})).await;
    assert_eq!(full.status(), 503);
    assert!(full.headers().contains_key("retry-after"));
    delete_call(&server, &id).await;
    server.stop().await;
}

/// A placed call's states are POSTed to its `status_url` as they change (ringing, answered,
/// ended), each signed with the server's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_calls_states_are_posted_to_its_status_url_signed() {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    type Posted = std::sync::Arc<std::sync::Mutex<Vec<(Option<String>, Bytes)>>>;
    let posted = Posted::default();
    let collect = posted.clone();
    let hooks = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| async move {
            let signature = headers
                .get("x-duplex-signature")
                .map(|v| v.to_str().unwrap().to_owned());
            collect.lock().unwrap().push((signature, body));
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hooks).await.unwrap() });

    let options = ServerOptions {
        token: Some("t0ken".into()),
        ..ServerOptions::default()
    };
    let (server, _) = start(options, sip::private_networks()).await;
    let mut callee = RawCallee::new().await;
    let client = reqwest::Client::new();
    let unsigned = client
        .post(format!("{}/api/calls", server.base_url))
        .json(&serde_json::json!({"to": format!("sip:bob@{}", callee.addr())}))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401, "the token is required when set");
    let placed = client
        .post(format!("{}/api/calls", server.base_url))
        .bearer_auth("t0ken")
        .json(&serde_json::json!({"to": format!("sip:bob@{}", callee.addr()), "status_url": hook_url}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);
    let invite = callee.expect("INVITE").await;
    callee.reply(&invite, "180 Ringing", "", "").await;
    callee.reply(&invite, "183 Session Progress", "", "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    callee.answer(&invite).await;
    callee.expect("ACK").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    callee.hang_up(&invite).await;
    let delivered = eventually(Duration::from_secs(5), || posted.lock().unwrap().len() >= 3).await;
    assert!(delivered, "{:?}", posted.lock().unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posted = posted.lock().unwrap().clone();
    let states: Vec<String> = posted
        .iter()
        .map(|(_, body)| {
            let report: serde_json::Value = serde_json::from_slice(body).unwrap();
            report["state"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        states,
        ["ringing", "answered", "ended"],
        "one event per state"
    );
    for (signature, body) in &posted {
        let expected = duplex::gateway::webhook::signature("t0ken", body);
        assert_eq!(signature.as_deref(), Some(expected.as_str()));
    }
    server.stop().await;
}

/// The agent calls a phone over TCP, and over TLS checking the phone's certificate against
/// `--sip-tls-ca`'s (a self-signed one made here); the phone's BYE comes to our TLS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_calls_a_phone_over_tcp_and_over_tls() {
    let (without_tls, _) = start(ServerOptions::default(), sip::private_networks()).await;
    let refused = place_call(&without_tls, serde_json::json!({"to": "sips:a@127.0.0.1"})).await;
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("--sip-tls-port"));
    without_tls.stop().await;

    let dir = common::scratch_dir("placed-tls");
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let certificate = params.self_signed(&key).unwrap();
    let (cert_pem, key_pem) = (certificate.pem(), key.serialize_pem());
    std::fs::write(dir.join("ca.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("phone.pem"), format!("{cert_pem}{key_pem}")).unwrap();
    let trusting = SipSettings {
        tls_client: Some(sip::tls_client_config(Some(&dir.join("ca.pem"))).unwrap()),
        ..settings(sip::private_networks())
    };
    let (trusting, ours) = with_tls(trusting).await;
    let (server, _) = start_sip(ServerOptions::default(), trusting).await;

    let listen = free_phone_port();
    let to = (listen, format!("sip:tester@{listen};transport=tcp"));
    let report = placed_echo_call(&server, to, G711_PHONE, "PCMU", String::new()).await;
    assert_eq!(report["reason"], "the other side hung up", "{report}");

    let listen = free_phone_port();
    let tls = SocketAddr::new(listen.ip(), listen.port() + 1);
    let config = format!(
        "sip_certificate\t{}\nsip_cafile\t{}\n",
        dir.join("phone.pem").display(),
        ours.cert_path.display()
    );
    let to = (listen, format!("sips:tester@{tls}"));
    let report = placed_echo_call(&server, to, SRTP_PHONE, "PCMU", config.clone()).await;
    assert_eq!(report["reason"], "the other side hung up", "{report}");
    ends_cleanly(server).await;

    // Without --sip-tls-ca the phone's self-signed certificate is refused, and the request
    // says so.
    let (untrusting, _) = with_tls(settings(sip::private_networks())).await;
    let (server, _) = start_sip(ServerOptions::default(), untrusting).await;
    let listen = free_phone_port();
    let tls = SocketAddr::new(listen.ip(), listen.port() + 1);
    let wav = speech_wav(G711_PHONE);
    let phone = tokio::task::spawn_blocking(move || {
        baresip_answering(listen, G711_PHONE, &wav, 3, &config)
    });
    listening(tls).await;
    let refused = place_call(
        &server,
        serde_json::json!({"to": format!("sips:tester@{tls}")}),
    )
    .await;
    assert_eq!(refused.status(), 400);
    let why = refused.text().await.unwrap();
    assert!(why.contains("certificate"), "{why}");
    phone.await.unwrap();
    server.stop().await;
}

/// A connection opened for a placed call closes once the call is over (no connection is
/// left behind per call), and one that closes while the call rings fails it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opened_for_a_call_closes_with_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, _) = start(ServerOptions::default(), sip::private_networks()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = format!("sip:bob@{};transport=tcp", listener.local_addr().unwrap());

    let id = dial(&server, serde_json::json!({"to": to})).await;
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut buf = vec![0u8; 65536];
    let len = stream.read(&mut buf).await.unwrap();
    let invite = String::from_utf8_lossy(&buf[..len]).into_owned();
    assert!(invite.starts_with("INVITE "), "{invite}");
    assert!(
        header(&invite, "Via").unwrap().starts_with("SIP/2.0/TCP "),
        "{invite}"
    );
    assert!(
        header(&invite, "Contact")
            .unwrap()
            .ends_with(";transport=tcp>"),
        "{invite}"
    );
    let busy = reply_to(&invite, "486 Busy Here", "");
    stream.write_all(busy.as_bytes()).await.unwrap();
    let mut rest = String::new();
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(len) => rest.push_str(&String::from_utf8_lossy(&buf[..len])),
            }
        }
    });
    assert!(closed.await.is_ok(), "the connection closes after the call");
    assert!(rest.starts_with("ACK "), "{rest}");
    assert_eq!(report_becomes(&server, &id, "failed").await["status"], 486);

    let id = dial(&server, serde_json::json!({"to": to})).await;
    let (stream, _) = listener.accept().await.unwrap();
    drop(stream);
    let report = report_becomes(&server, &id, "failed").await;
    assert!(
        report["reason"].as_str().unwrap().contains("closed"),
        "{report}"
    );
    server.stop().await;
}

/// A response to `request` written out by hand: its dialog headers copied (To with `tag`
/// added where it has none), then `extra` and `sdp`.
fn response_to(request: &str, status: &str, tag: &str, extra: &str, sdp: &str) -> String {
    let copied: String = request
        .lines()
        .filter(|l| {
            ["Via:", "From:", "Call-ID:", "CSeq:"]
                .iter()
                .any(|h| l.starts_with(h))
        })
        .map(|l| format!("{l}\r\n"))
        .collect();
    let to = header(request, "To").unwrap();
    let tag = match to.contains(";tag=") {
        true => String::new(),
        false => format!(";tag={tag}"),
    };
    let content_type = match sdp.is_empty() {
        true => "",
        false => "Content-Type: application/sdp\r\n",
    };
    format!(
        "SIP/2.0 {status}\r\n{copied}To: {to}{tag}\r\n{extra}{content_type}Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

/// The test PBX's answer to `request`, without a body.
fn reply_to(request: &str, status: &str, extra: &str) -> String {
    response_to(request, status, "pbx", extra, "")
}

/// Over TCP (`--sip-register sip:7000@pbx;transport=tcp`) the registration keeps one
/// connection to the PBX: the REGISTER goes down it, the PBX's call comes down it and is
/// answered on it, a call placed to a number goes down it, and at shutdown our BYE and the
/// withdrawal do too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_over_tcp_carries_the_pbxs_calls_both_ways() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let aor = format!("sip:7000@{at};transport=tcp");
    let register = RegisterSettings::parse(&aor, "s3cret".into(), None).unwrap();
    let registering = SipSettings {
        register: Some(register),
        ..settings(vec!["192.0.2.0/24".parse().unwrap()])
    };
    let (server, sip) = start_sip(ServerOptions::default(), registering).await;
    let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept());
    let (stream, _) = accepted.await.expect("a connection to the PBX").unwrap();
    let mut pbx = SipStream {
        stream,
        pending: Vec::new(),
    };
    let register = pbx.final_message().await;
    assert!(
        register.starts_with(&format!("REGISTER sip:{at} SIP/2.0")),
        "{register}"
    );
    assert!(
        header(&register, "Via")
            .unwrap()
            .starts_with("SIP/2.0/TCP ")
    );
    assert!(
        header(&register, "Contact")
            .unwrap()
            .ends_with(";transport=tcp>"),
        "{register}"
    );
    pbx.write(&reply_to(&register, "200 OK", "Expires: 300\r\n"))
        .await;
    let registered = &server.metrics.sip_registered;
    assert!(eventually(Duration::from_secs(2), || registered.get() == 1).await);

    // The PBX calls the extension down the connection.
    let rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sdp = offer_at(rtp.local_addr().unwrap().port(), "0");
    let invite = format!(
        "INVITE sip:7000@{sip} SIP/2.0\r\nVia: SIP/2.0/TCP {at};branch=z9hG4bKpbx1\r\n\
From: <sip:100@{at}>;tag=pbx\r\nTo: <sip:7000@{sip}>\r\nCall-ID: pbx-call-1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:pbx@{at};transport=tcp>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len(),
        sip = sip.udp,
    );
    pbx.write(&invite).await;
    let answered = pbx.final_message().await;
    assert!(answered.starts_with("SIP/2.0 200 "), "{answered}");
    let ack = format!(
        "ACK sip:7000@{sip} SIP/2.0\r\nVia: SIP/2.0/TCP {at};branch=z9hG4bKpbx2\r\n\
From: <sip:100@{at}>;tag=pbx\r\nTo: {to}\r\nCall-ID: pbx-call-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        sip = sip.udp,
        to = header(&answered, "To").unwrap(),
    );
    pbx.write(&ack).await;

    // A number placed through the PBX goes down the same connection.
    let id = dial(&server, serde_json::json!({"to": "8001"})).await;
    let placed = pbx.final_message().await;
    assert!(
        placed.starts_with(&format!("INVITE sip:8001@{at} SIP/2.0")),
        "{placed}"
    );
    assert!(header(&placed, "Via").unwrap().starts_with("SIP/2.0/TCP "));
    pbx.write(&reply_to(&placed, "486 Busy Here", "")).await;
    let ack = pbx.final_message().await;
    assert!(ack.starts_with("ACK "), "{ack}");
    let report = report_becomes(&server, &id, "failed").await;
    assert_eq!(
        (report["status"].as_u64(), report["transport"].as_str()),
        (Some(486), Some("tcp"))
    );

    // At shutdown: our BYE for the PBX's call and the withdrawal, both down the connection.
    let metrics = server.metrics.clone();
    let stopping = tokio::spawn(server.stop());
    let (mut bye, mut withdrawn) = (false, false);
    while !(bye && withdrawn) {
        let request = pbx.final_message().await;
        bye |= request.starts_with("BYE ");
        withdrawn |= request.starts_with("REGISTER ") && header(&request, "Expires") == Some("0");
        pbx.write(&reply_to(&request, "200 OK", "")).await;
    }
    let took = stopping.await.unwrap();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    assert_eq!(metrics.sip_registered.get(), 0);
}
