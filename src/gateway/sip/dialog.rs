//! A SIP call between its INVITE and its end (RFC 3261 §12): what identifies it, what answers
//! requests within it, and the BYE that ends it from our side.

use super::message::{self, Request, RequestHead, Response};
use super::offer::{AudioOffer, Direction, OfferError, SipCodec};
use super::transport::Peer;
use crate::engine::SessionId;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// The methods this user agent answers.
pub const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS";

/// A live call, by its Call-ID in the server's table.
pub struct Dialog {
    pub id: SessionId,
    /// The caller's From tag and ours (the To tag of our 200): a request within the call
    /// carries both, so knowing the Call-ID alone reaches nothing.
    pub remote_tag: String,
    pub local_tag: String,
    /// The 200 OK, sent again while the caller retransmits its INVITE or has not ACKed it.
    pub answer: String,
    pub acked: Arc<Notify>,
    /// The offer in force, watched by the call's media; a re-INVITE replaces it. None until
    /// the ACK answers our late offer.
    pub offer: watch::Sender<Option<AudioOffer>>,
    pub local_rtp: SocketAddr,
    /// Our Contact header's value.
    pub contact: String,
    pub sdp_id: u64,
    pub sdp_version: u64,
    /// The CSeq number of the INVITE that opened the call: its ACK carries the same.
    pub invite_cseq: Option<u32>,
    /// The CSeq number of a re-INVITE without SDP that our 200 answered with an offer: its
    /// ACK carries the caller's answer (RFC 3261 §14.2).
    pub reoffer_cseq: Option<u32>,
    /// The last re-INVITE answered: its CSeq and the answer, sent again on a retransmission.
    pub last_reinvite: Option<(String, String)>,
    /// The codecs our late offer carried, the preferred first.
    pub codecs: Vec<SipCodec>,
    pub cancel: CancellationToken,
    /// A call the agent placed: no INVITE of the other side's to answer again.
    pub outbound: bool,
}

impl Dialog {
    /// Whether `request`'s tags are this call's (the To tag only where the method has one).
    pub fn owns(&self, request: &Request) -> bool {
        let from_matches = request.tag("From") == Some(self.remote_tag.as_str());
        let to_matches = match request.method.as_str() {
            "CANCEL" => true,
            _ => request.tag("To") == Some(self.local_tag.as_str()),
        };
        from_matches && to_matches
    }

    /// The ACK of our 200: the retransmissions stop, and where the INVITE had no offer, the
    /// ACK's answer to ours starts the media.
    pub fn ack(&mut self, ack: &Request) -> Result<(), OfferError> {
        if self.reoffer_cseq.is_some() && cseq_number(ack) == self.reoffer_cseq {
            self.reoffer_cseq = None;
            let renegotiated = match self.offer.borrow().as_ref() {
                Some(offer) => offer.renegotiate(&ack.body),
                None => Err(OfferError::Pending),
            };
            self.offer.send_replace(Some(renegotiated?));
            return Ok(());
        }
        if cseq_number(ack) != self.invite_cseq {
            // The ACK of a refused re-INVITE.
            return Ok(());
        }
        self.acked.notify_one();
        if self.offer.borrow().is_some() {
            return Ok(());
        }
        let answer = AudioOffer::parse(&ack.body, &self.codecs)?;
        if answer.crypto.is_some() {
            // Our late offer had no keys: an answer cannot add SRTP (we would send in clear
            // what it expects encrypted).
            return Err(OfferError::CryptoChanged("plain RTP, as our offer"));
        }
        self.offer.send_replace(Some(answer));
        Ok(())
    }

    /// A re-INVITE without SDP (a PBX taking a call off hold, or moving it): our offer in the
    /// 200, the call's codec both ways; the ACK answers it.
    fn reoffer(&mut self, request: &Request) -> String {
        let Some(mut ours) = self.offer.borrow().clone() else {
            let why = [warning(&OfferError::Pending)];
            return request.response(491, "Request Pending", None, &why, None);
        };
        ours.direction = Direction::SendRecv;
        self.sdp_version += 1;
        self.reoffer_cseq = cseq_number(request);
        let body = ours.answer(self.local_rtp, self.sdp_id, self.sdp_version);
        let extra = [("Contact", self.contact.clone()), ("Allow", ALLOW.into())];
        request.response(200, "OK", None, &extra, Some(("application/sdp", &body)))
    }

    /// Whether an INVITE without a To tag is this call's own, sent again.
    pub fn owns_initial(&self, invite: &Request) -> bool {
        !self.outbound && invite.tag("From") == Some(self.remote_tag.as_str())
    }

    /// The answer to a re-INVITE (hold, a moved media address, a session refresh): 200 with
    /// our SDP, its version counted up, once the new offer keeps the call's codec; 488 (and
    /// the call goes on as it was) when it does not.
    pub fn reinvite(&mut self, request: &Request) -> String {
        let cseq = request.header("CSeq").unwrap_or_default();
        if let Some((_, answer)) = self.last_reinvite.as_ref().filter(|(last, _)| last == cseq) {
            return answer.clone();
        }
        if request.body.trim().is_empty() {
            let answer = self.reoffer(request);
            self.last_reinvite = Some((cseq.to_owned(), answer.clone()));
            return answer;
        }
        let renegotiated = match self.offer.borrow().as_ref() {
            Some(offer) => offer.renegotiate(&request.body),
            None => Err(OfferError::Pending),
        };
        let answer = match renegotiated {
            Ok(offer) => {
                self.sdp_version += 1;
                let body = offer.answer(self.local_rtp, self.sdp_id, self.sdp_version);
                self.offer.send_replace(Some(offer));
                let extra = [("Contact", self.contact.clone()), ("Allow", ALLOW.into())];
                let sdp = Some(("application/sdp", body.as_str()));
                request.response(200, "OK", None, &extra, sdp)
            }
            Err(OfferError::Pending) => {
                let why = [warning(&OfferError::Pending)];
                request.response(491, "Request Pending", None, &why, None)
            }
            Err(err) => not_acceptable(request, &err),
        };
        self.last_reinvite = Some((cseq.to_owned(), answer.clone()));
        answer
    }
}

/// The number of a request's CSeq.
pub fn cseq_number(request: &Request) -> Option<u32> {
    request
        .header("CSeq")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `488 Not Acceptable Here` with the reason.
pub fn not_acceptable(request: &Request, err: &OfferError) -> String {
    request.response(488, "Not Acceptable Here", None, &[warning(err)], None)
}

/// A `Warning` header (RFC 3261 §20.43) that says why.
pub fn warning(why: &dyn std::fmt::Display) -> (&'static str, String) {
    let text = why.to_string().replace('"', "'");
    ("Warning", format!("399 duplex \"{text}\""))
}

/// Everything a BYE from our side needs: the dialog as the INVITE set it up.
pub struct ByeTarget {
    /// The caller's Contact URI (the BYE's request URI).
    uri: String,
    /// Our From: the INVITE's To with our tag.
    from: String,
    /// Our To: the INVITE's From.
    to_header: String,
    /// The INVITE's Record-Route, in order: the BYE's Route (RFC 3261 §12.1.1).
    route: Vec<String>,
    /// Where the INVITE came from (its Contact may name an address behind NAT), and the way
    /// back: over TCP, the connection it came on.
    pub to: Peer,
    /// Our Via's address.
    via: SocketAddr,
    /// Our CSeq number: above any of our requests before it in the dialog.
    cseq: u32,
}

impl ByeTarget {
    pub fn new(invite: &Request, local_tag: &str, from: Peer, via: SocketAddr) -> Self {
        Self {
            cseq: 1,
            uri: invite
                .contact_uri()
                .map_or_else(|| format!("sip:{}", from.addr), str::to_owned),
            from: format!(
                "{};tag={local_tag}",
                invite.header("To").unwrap_or_default()
            ),
            to_header: invite.header("From").unwrap_or_default().to_owned(),
            route: invite.headers_named("Record-Route"),
            to: from,
            via,
        }
    }

    /// The BYE of a call the agent placed: `answer` is the callee's 2xx to our INVITE of
    /// `invite_cseq`, sent `from` (our From header, with its tag); requests within the call
    /// go to `hop`.
    pub fn placed(
        answer: &Response,
        from: String,
        hop: Peer,
        via: SocketAddr,
        invite_cseq: u32,
    ) -> Self {
        let mut route: Vec<String> = answer
            .headers_named("Record-Route")
            .iter()
            .flat_map(|value| message::split_list(value))
            .collect();
        // A UAC's route set is the Record-Route reversed (RFC 3261 §12.1.2).
        route.reverse();
        Self {
            uri: answer
                .contact_uri()
                .map_or_else(|| format!("sip:{}", hop.addr), str::to_owned),
            from,
            to_header: answer.header("To").unwrap_or_default().to_owned(),
            route,
            to: hop,
            via,
            cseq: invite_cseq + 1,
        }
    }

    /// The ACK of the 2xx this target was made from: the same request URI, route and tags.
    pub fn ack(&self, call_id: &str, invite_cseq: u32) -> String {
        self.in_dialog("ACK", call_id, invite_cseq)
    }

    /// The BYE's CSeq number: its answer names it.
    pub fn cseq(&self) -> u32 {
        self.cseq
    }

    pub fn request(&self, call_id: &str) -> String {
        self.in_dialog("BYE", call_id, self.cseq)
    }

    fn in_dialog(&self, method: &str, call_id: &str, cseq: u32) -> String {
        let head = RequestHead {
            method,
            uri: &self.uri,
            transport: self.to.transport(),
            via: self.via,
            branch: &message::new_branch(),
            from: &self.from,
            to: &self.to_header,
            call_id,
            cseq,
        }
        .write();
        let route: Vec<(&str, String)> = self.route.iter().map(|r| ("Route", r.clone())).collect();
        message::finish(head, &route, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::sip::message::tests::INVITE;

    #[test]
    fn our_bye_swaps_the_dialog_and_follows_the_record_route() {
        let routed = INVITE.replacen(
            "Max-Forwards: 70\r\n",
            "Max-Forwards: 70\r\nRecord-Route: <sip:proxy.example;lr>\r\n",
            1,
        );
        let invite = Request::parse(routed.as_bytes()).unwrap();
        let from: SocketAddr = "127.0.0.1:15080".parse().unwrap();
        let bye = ByeTarget::new(
            &invite,
            "ours",
            Peer::udp(from),
            "127.0.0.1:5070".parse().unwrap(),
        );
        let text = bye.request("ee2b285254bc8bd8");
        assert!(text.starts_with("BYE sip:tester-0x5592561bd4a0@127.0.0.1:15080 SIP/2.0\r\n"));
        assert!(
            text.contains("\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK"),
            "{text}"
        );
        assert!(text.contains("\r\nFrom: <sip:NATF0@127.0.0.1:5070;transport=udp>;tag=ours\r\n"));
        assert!(text.contains("\r\nTo: <sip:tester@127.0.0.1>;tag=8716cb073e5bc7b2\r\n"));
        assert!(
            text.contains("\r\nRoute: <sip:proxy.example;lr>\r\n"),
            "{text}"
        );
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"));
    }
}
