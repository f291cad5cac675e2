//! The e-mail and MQTT alert sinks against real servers: a small SMTP
//! server written here (tokio, on 127.0.0.1:0) and a Mosquitto child
//! process (killed and reaped on drop) with a real rumqttc subscriber.
//! Every wait is bounded by a generous deadline; nothing sleeps to
//! synchronise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_aggregator::alerts::config::{
    EmailConfig, MqttSinkConfig, SmtpTls, DEFAULT_EMAIL_BODY, DEFAULT_EMAIL_SUBJECT,
    DEFAULT_MQTT_TOPIC_PREFIX,
};
use outpost_aggregator::alerts::email::EmailSink;
use outpost_aggregator::alerts::mqtt::{self, MqttSink};
use outpost_aggregator::alerts::template::Template;
use outpost_aggregator::alerts::{AlertSink, Notification, SCHEMA};
use outpost_aggregator::rules::model::{AlertState, Severity};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::mosquitto::{free_port, Mosquitto};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound of every wait; generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn notification(state: AlertState, number: u64) -> Notification {
    Notification {
        schema: SCHEMA.into(),
        id: format!("9f3a0c11d2e4b5a6-{number}"),
        fingerprint: "9f3a0c11d2e4b5a6".into(),
        number,
        repeat: 0,
        state,
        rule: "boiler-overheat".into(),
        device: "gw-7".into(),
        sensor: "temp".into(),
        severity: Severity::Critical,
        labels: [("site".to_owned(), "north".to_owned())].into(),
        summary: "temp 91.5 > 90".into(),
        value: Some(91.5),
        threshold: Some(90.0),
        event_time_ms: 1_700_000_000_123,
        processing_time_ms: 1_700_000_000_200,
        active_since_ms: Some(1_700_000_000_123),
        queued_ms: 1_700_000_000_250,
        history_id: i64::try_from(number).unwrap(),
    }
}

// ------------------------------------------------------------------ SMTP

/// How the test server answers RCPT TO.
#[derive(Clone, Copy, PartialEq)]
enum Rcpt {
    Accept,
    Reject,
}

#[derive(Debug, Clone)]
struct Mail {
    from: String,
    to: Vec<String>,
    /// The message as sent, dot-stuffing undone, without the final dot.
    data: String,
}

#[derive(Default)]
struct SmtpLog {
    /// Every command line received, in order.
    commands: Vec<String>,
    mails: Vec<Mail>,
}

/// A minimal SMTP server: 220, EHLO (no STARTTLS, no AUTH), MAIL, RCPT,
/// DATA, QUIT. Records what it got.
struct Smtp {
    addr: SocketAddr,
    log: Arc<Mutex<SmtpLog>>,
    task: JoinHandle<()>,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Smtp {
    async fn start(rcpt: Rcpt) -> Smtp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(SmtpLog::default()));
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(smtp_session(s, rcpt, l.clone()));
            }
        });
        Smtp { addr, log, task }
    }

    fn mails(&self) -> Vec<Mail> {
        self.log.lock().unwrap().mails.clone()
    }

    fn commands(&self) -> Vec<String> {
        self.log.lock().unwrap().commands.clone()
    }
}

async fn smtp_session(s: TcpStream, rcpt: Rcpt, log: Arc<Mutex<SmtpLog>>) {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut from = String::new();
    let mut to = Vec::new();
    if w.write_all(b"220 test.invalid ESMTP ready\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let cmd = line.trim_end().to_owned();
        log.lock().unwrap().commands.push(cmd.clone());
        let upper = cmd.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-test.invalid\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n"
        } else if upper.starts_with("HELO") || upper == "NOOP" {
            b"250 ok\r\n"
        } else if upper == "RSET" {
            from.clear();
            to.clear();
            b"250 ok\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = address(&cmd);
            b"250 2.1.0 sender ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            if rcpt == Rcpt::Reject {
                b"550 5.1.1 <nobody@example.com>: mailbox unavailable\r\n"
            } else {
                to.push(address(&cmd));
                b"250 2.1.5 recipient ok\r\n"
            }
        } else if upper == "DATA" {
            if w.write_all(b"354 end with <CRLF>.<CRLF>\r\n")
                .await
                .is_err()
            {
                return;
            }
            let mut data = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line == ".\r\n" {
                    // That CRLF belongs to the terminator <CRLF>.<CRLF>.
                    if data.ends_with("\r\n") {
                        data.truncate(data.len() - 2);
                    }
                    break;
                }
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            log.lock().unwrap().mails.push(Mail {
                from: std::mem::take(&mut from),
                to: std::mem::take(&mut to),
                data,
            });
            b"250 2.0.0 queued\r\n"
        } else if upper == "QUIT" {
            let _ = w.write_all(b"221 2.0.0 bye\r\n").await;
            return;
        } else {
            b"502 5.5.2 command not implemented\r\n"
        };
        if w.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// `x@y` of `MAIL FROM:<x@y> ...`.
fn address(cmd: &str) -> String {
    let start = cmd.find('<').map_or(0, |i| i + 1);
    let end = cmd.find('>').unwrap_or(cmd.len());
    cmd[start..end].to_owned()
}

/// The headers (unfolded) and the body of a message.
fn split_message(data: &str) -> (String, String) {
    let (head, body) = data.split_once("\r\n\r\n").expect("header/body separator");
    (
        head.replace("\r\n ", " ").replace("\r\n\t", "\t"),
        body.to_owned(),
    )
}

fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

fn email_cfg(addr: SocketAddr, tls: SmtpTls) -> EmailConfig {
    EmailConfig {
        host: addr.ip().to_string(),
        port: Some(addr.port()),
        tls,
        username: None,
        password: None,
        from: "Outpost <alerts@example.com>".into(),
        to: vec!["ops@example.com".into(), "oncall@example.com".into()],
        subject: DEFAULT_EMAIL_SUBJECT.into(),
        body: DEFAULT_EMAIL_BODY.into(),
        ca_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_arrives_with_rendered_subject_body_addresses_and_ids() {
    init_logs();
    let server = Smtp::start(Rcpt::Accept).await;
    let sink = EmailSink::new(
        "mail",
        &email_cfg(server.addr, SmtpTls::None),
        Duration::from_secs(30),
    )
    .unwrap();
    let firing = notification(AlertState::Firing, 1);
    let mut resolved = notification(AlertState::Resolved, 2);
    resolved.summary = "temp 80 <= 90".into();
    sink.send(&firing).await.unwrap();
    sink.send(&resolved).await.unwrap();

    let mails = server.mails();
    assert_eq!(mails.len(), 2, "{mails:?}");
    let subject = Template::parse(DEFAULT_EMAIL_SUBJECT).unwrap();
    let body = Template::parse(DEFAULT_EMAIL_BODY).unwrap();
    for (mail, n) in mails.iter().zip([&firing, &resolved]) {
        assert_eq!(mail.from, "alerts@example.com");
        assert_eq!(mail.to, vec!["ops@example.com", "oncall@example.com"]);
        let (head, text) = split_message(&mail.data);
        // An ASCII subject goes out as it is, not RFC 2047-encoded.
        assert_eq!(
            header(&head, "Subject").as_deref(),
            Some(subject.render(n).as_str()),
            "{head}"
        );
        assert_eq!(
            header(&head, "Message-ID"),
            Some(format!("<{}@outpost>", n.id)),
            "{head}"
        );
        assert_eq!(
            header(&head, "X-Outpost-Id").as_deref(),
            Some(n.id.as_str())
        );
        assert_eq!(
            header(&head, "From").as_deref(),
            Some("Outpost <alerts@example.com>")
        );
        assert_eq!(
            header(&head, "To").as_deref(),
            Some("ops@example.com, oncall@example.com")
        );
        assert_eq!(
            header(&head, "Content-Transfer-Encoding").as_deref(),
            Some("7bit")
        );
        assert_eq!(text.replace("\r\n", "\n"), body.render(n));
    }
    assert!(mails[0]
        .data
        .contains("[FIRING] critical: boiler-overheat on gw-7"));
    assert!(mails[1]
        .data
        .contains("[RESOLVED] critical: boiler-overheat on gw-7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_rejected_recipient_is_an_error_with_the_servers_reply() {
    init_logs();
    let server = Smtp::start(Rcpt::Reject).await;
    let sink = EmailSink::new(
        "mail",
        &email_cfg(server.addr, SmtpTls::None),
        Duration::from_secs(30),
    )
    .unwrap();
    let e = sink
        .send(&notification(AlertState::Firing, 1))
        .await
        .unwrap_err();
    assert!(e.0.contains("550"), "{e}");
    assert!(e.0.contains("mailbox unavailable"), "{e}");
    assert!(server.mails().is_empty());
    assert!(
        !server.commands().iter().any(|c| c == "DATA"),
        "{:?}",
        server.commands()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_without_a_server_is_an_error() {
    init_logs();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let sink = EmailSink::new(
        "mail",
        &email_cfg(addr, SmtpTls::None),
        Duration::from_secs(30),
    )
    .unwrap();
    let started = Instant::now();
    let e = sink
        .send(&notification(AlertState::Firing, 1))
        .await
        .unwrap_err();
    assert!(e.0.contains(&addr.to_string()), "{e}");
    assert!(started.elapsed() < DEADLINE, "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_server_that_never_answers_times_out() {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts and keeps the connection, never greets.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let timeout = Duration::from_secs(1);
    let sink = EmailSink::new("mail", &email_cfg(addr, SmtpTls::None), timeout).unwrap();
    let started = Instant::now();
    let e = sink
        .send(&notification(AlertState::Firing, 1))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took >= timeout && took < DEADLINE, "{took:?}: {e}");
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_starttls_required_but_not_offered_is_an_error_not_clear_text() {
    init_logs();
    let server = Smtp::start(Rcpt::Accept).await;
    let sink = EmailSink::new(
        "mail",
        &email_cfg(server.addr, SmtpTls::Starttls),
        Duration::from_secs(30),
    )
    .unwrap();
    let e = sink
        .send(&notification(AlertState::Firing, 1))
        .await
        .unwrap_err();
    assert!(e.0.to_ascii_lowercase().contains("starttls"), "{e}");
    let commands = server.commands();
    assert!(
        !commands
            .iter()
            .any(|c| c.starts_with("MAIL") || c.starts_with("RCPT") || c == "DATA"),
        "sent in clear: {commands:?}"
    );
    assert!(server.mails().is_empty());

    // Opportunistic falls back to plain text with this server.
    let sink = EmailSink::new(
        "mail",
        &email_cfg(server.addr, SmtpTls::Opportunistic),
        Duration::from_secs(30),
    )
    .unwrap();
    sink.send(&notification(AlertState::Firing, 1))
        .await
        .unwrap();
    assert_eq!(server.mails().len(), 1);
}

// ------------------------------------------------------------------ MQTT

/// A rumqttc subscriber on `outpost/v1/alerts/#` (QoS 1).
struct Subscriber {
    publishes: mpsc::UnboundedReceiver<rumqttc::Publish>,
    task: JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// Connects and returns once the broker granted the subscription.
    async fn start(port: u16) -> Subscriber {
        let mut opts = MqttOptions::new("test-alert-subscriber", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        let (tx, publishes) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = watch::channel(false);
        let filter = format!("{DEFAULT_MQTT_TOPIC_PREFIX}/#");
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // Retry pace of a test client, not a synchronisation.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed.wait_for(|s| *s))
            .await
            .expect("subscribed in time")
            .unwrap();
        Subscriber { publishes, task }
    }

    /// The next publish, as a notification, with its topic.
    async fn next(&mut self) -> (String, Notification) {
        let p = tokio::time::timeout(DEADLINE, self.publishes.recv())
            .await
            .expect("a notification in time")
            .expect("subscriber running");
        let n = serde_json::from_slice(&p.payload).expect("a JSON notification");
        (p.topic, n)
    }
}

fn mqtt_cfg(port: Option<u16>) -> MqttSinkConfig {
    MqttSinkConfig {
        host: port.map(|_| "127.0.0.1".to_owned()),
        port,
        client_id: None,
        username: None,
        password: None,
        topic_prefix: DEFAULT_MQTT_TOPIC_PREFIX.into(),
        retain: false,
    }
}

const ALERT_TOPIC: &str = "outpost/v1/alerts/critical/boiler-overheat";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_firing_and_resolved_reach_a_subscriber() {
    init_logs();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port).await;
    let cancel = CancellationToken::new();
    // host/port unset: the aggregator's own broker is used.
    let sink = MqttSink::new(
        "mq",
        &mqtt_cfg(None),
        ("127.0.0.1".into(), broker.port),
        Duration::from_secs(30),
        cancel.clone(),
    )
    .unwrap();
    let firing = notification(AlertState::Firing, 1);
    let resolved = notification(AlertState::Resolved, 2);
    assert_eq!(mqtt::topic(DEFAULT_MQTT_TOPIC_PREFIX, &firing), ALERT_TOPIC);
    sink.send(&firing).await.unwrap();
    sink.send(&resolved).await.unwrap();
    assert_eq!(sub.next().await, (ALERT_TOPIC.to_owned(), firing));
    assert_eq!(sub.next().await, (ALERT_TOPIC.to_owned(), resolved));
    // Cancelled: the sink stops (a send racing with the stop may still go
    // out; once stopped, every send fails).
    cancel.cancel();
    let end = Instant::now() + DEADLINE;
    loop {
        match sink.send(&notification(AlertState::Firing, 3)).await {
            Err(e) if e.0.contains("stopped") => break,
            r => assert!(Instant::now() < end, "still sending after cancel: {r:?}"),
        }
    }
}

/// A TCP proxy in front of the broker that can hold back what the broker
/// sends (PUBACKs), while the client's packets still reach it.
struct Proxy {
    port: u16,
    hold: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (hold, hold_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut br, mut bw) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut bw).await;
                    let _ = bw.shutdown().await;
                });
                let mut hold = hold_rx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        if hold.wait_for(|h| !*h).await.is_err() {
                            return;
                        }
                        let n = tokio::select! {
                            biased;
                            _ = hold.wait_for(|h| *h) => continue,
                            r = br.read(&mut buf) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            },
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Proxy { port, hold, task }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_send_is_ok_only_after_the_puback_and_never_resent_by_the_client() {
    init_logs();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port).await;
    let proxy = Proxy::start(broker.port).await;
    let cancel = CancellationToken::new();
    let timeout = Duration::from_secs(2);
    let sink = MqttSink::new(
        "mq",
        &mqtt_cfg(Some(proxy.port)),
        ("unused".into(), 1),
        timeout,
        cancel.clone(),
    )
    .unwrap();
    let first = notification(AlertState::Firing, 1);
    sink.send(&first).await.unwrap();
    assert_eq!(sub.next().await.1, first);

    // The broker gets and routes the publish, but its PUBACK does not reach
    // the sink: not delivered as far as the outbox knows.
    proxy.hold.send_replace(true);
    let held = notification(AlertState::Resolved, 2);
    let e = sink.send(&held).await.unwrap_err();
    assert!(e.0.contains("no PUBACK"), "{e}");
    assert_eq!(sub.next().await.1, held);
    proxy.hold.send_replace(false);

    // The sink dropped that connection; a later send goes out on a new
    // one and succeeds on its own PUBACK.
    let later = notification(AlertState::Firing, 3);
    let end = Instant::now() + DEADLINE;
    while let Err(e) = sink.send(&later).await {
        assert!(Instant::now() < end, "never delivered: {e}");
    }
    // Mosquitto keeps one publisher's order per subscriber, so a resend of
    // the held notification by the client would arrive before this one.
    let (topic, n) = sub.next().await;
    assert_eq!((topic.as_str(), &n), (ALERT_TOPIC, &later));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_send_fails_in_time_while_the_broker_is_down_then_reconnects() {
    init_logs();
    let port = free_port();
    let cancel = CancellationToken::new();
    let timeout = Duration::from_secs(2);
    let sink = MqttSink::new(
        "mq",
        &mqtt_cfg(Some(port)),
        ("unused".into(), 1),
        timeout,
        cancel.clone(),
    )
    .unwrap();
    let down = notification(AlertState::Firing, 1);
    let started = Instant::now();
    let e = sink.send(&down).await.unwrap_err();
    let took = started.elapsed();
    assert!(took >= timeout && took < DEADLINE, "{took:?}: {e}");
    assert!(e.0.contains("not connected"), "{e}");

    let broker = Mosquitto::start_on(port);
    let mut sub = Subscriber::start(broker.port).await;
    let up = notification(AlertState::Firing, 2);
    let end = Instant::now() + DEADLINE;
    while let Err(e) = sink.send(&up).await {
        assert!(
            Instant::now() < end,
            "never delivered after the broker started: {e}"
        );
    }
    // What failed during the outage was never queued in the client, so
    // the first notification after the restart is the new one.
    assert_eq!(sub.next().await, (ALERT_TOPIC.to_owned(), up));
    cancel.cancel();
}
